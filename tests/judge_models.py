"""A tiny judge checkpoint built by the project's own code (the demo's tokenizer + random tiny LLaVA, exported to
HF format by `pipeline.prepare_base_model`), then rewired so its greedy reply is a known verdict.

Rewiring: one added token whose text is the verdict line; every token embeds to the same vector and the attention
/ MLP outputs are zeroed, so the last hidden state is the same for every prompt, and the head scores only the
verdict token. The reply to any prompt is that line repeated (one per new token).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

VERDICT = "Factuality Score: 7\n"


def constant_judge(workdir: Path, verdict: str = VERDICT) -> Path:
    from vlmu_jax.config_schema import base_config
    from vlmu_jax.data.templates import load_tokenizer
    from vlmu_jax.pipeline import Workspace, prepare_base_model, prepare_data

    c = base_config()
    c.data.synthetic_identities, c.model.tiny, c.model.dtype = 4, True, "float32"
    ws = Workspace(c, workdir)
    prepare_data(ws)
    prepare_base_model(ws)
    folder = ws.base_model
    tok = load_tokenizer(folder)
    tok.add_tokens([verdict])
    tok.save_pretrained(folder)
    verdict_id, vocab = tok.convert_tokens_to_ids(verdict), len(tok)
    tensors = load_file(str(folder / "model.safetensors"))
    hidden = tensors["lm_head.weight"].shape[1]
    tensors["model.language_model.embed_tokens.weight"] = np.ones((vocab, hidden), np.float32)
    head = np.zeros((vocab, hidden), np.float32)
    head[verdict_id] = 1.0
    tensors["lm_head.weight"] = head
    for name in tensors:
        if "language_model.layers" in name and name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name] = np.zeros_like(tensors[name])
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["vocab_size"] = vocab
    (folder / "config.json").write_text(json.dumps(config))
    return folder
