"""Prompt templates per architecture, as the seeds build them, and the tokenizer path.

FIUBench (`config/model_config.yaml` + `data_module.py`) builds `system_tag + question_start_tag +
"<image>\\n" + question + answer_tag + answer` for LLaVA models and uses the processor's chat template for
Llama-3.2-Vision; MLLMU (`data_process/data_preprocess.py`) builds `"USER: <image>\\n{question}\\nASSISTANT:
{answer}"` for LLaVA and Idefics2's chat template. No seed appends EOS to LLaVA answers; chat templates close
the turn with their own token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from vlmu_jax.errors import InputError

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions. "
)


@dataclass(frozen=True)
class Template:
    """`prompt(q)` is everything before the answer; labels start after it. The BOS token is prepended as an id
    (`prepend_bos`), never as text, so tokenizers that also add it cannot double it."""

    name: str
    user_prefix: str
    answer_prefix: str
    system: str = ""
    image_text: str = "<image>\n"
    question_end: str = ""
    answer_suffix: str = ""
    text_user_prefix: str | None = None  # when a text-only turn starts differently (Idefics2: "User: ")
    image_token: str = "<image>"
    prepend_bos: bool = True
    # What the processor writes for one image in a hand-written prompt (MLLMU eval.py's "<image>"), before the image
    # token is expanded: Idefics2 wraps it in <fake_token_around_image> markers.
    image_markup: str = "<image>"

    def prompt(self, question: str, with_image: bool = True) -> str:
        user = self.user_prefix if with_image or self.text_user_prefix is None else self.text_user_prefix
        image = self.image_text if with_image else ""
        return f"{self.system}{user}{image}{question}{self.question_end}{self.answer_prefix}"

    def raw(self) -> Template:
        """No wrapping: the question is the whole prompt, written by hand with its own image markup."""
        return replace(self, name=f"{self.name}-raw", system="", user_prefix="", text_user_prefix=None,
                       image_text="", question_end="", answer_prefix="", answer_suffix="")

    def full(self, question: str, answer: str, with_image: bool = True) -> tuple[str, str]:
        """(prompt, prompt + answer + end-of-turn)."""
        prompt = self.prompt(question, with_image)
        return prompt, prompt + answer + self.answer_suffix


TEMPLATES: dict[str, Template] = {
    # FIUBench llava-v1.5-vicuna / llava-v1.6-vicuna (model_config.yaml).
    "llava-1.5": Template(
        "llava-1.5", user_prefix="USER: ", answer_prefix=" ASSISTANT: ", system=VICUNA_SYSTEM
    ),
    # FIUBench llava-phi (xtuner/llava-phi-3-mini-hf).
    "llava-phi": Template("llava-phi", user_prefix="<|user|>\n", answer_prefix="<|end|>\n<|assistant|>\n"),
    # FIUBench llama-3.2-vision: Mllama chat template (no system block when an image is present), BOS =
    # begin_of_text.
    "llama-3.2-vision": Template(
        "llama-3.2-vision",
        user_prefix="<|start_header_id|>user<|end_header_id|>\n\n",
        answer_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        image_text="<|image|>",
        question_end="<|eot_id|>",
        answer_suffix="<|eot_id|>",
        image_token="<|image|>",
        image_markup="<|image|>",
    ),
    # MLLMU train_collate_fn_llava.
    "mllmu-llava": Template(
        "mllmu-llava", user_prefix="USER: ", answer_prefix="ASSISTANT: ", question_end="\n"
    ),
    # MLLMU train_collate_fn_idefics: Idefics2 chat template, stripped; the processor expands <image> between
    # <fake_token_around_image> markers, which is why they are part of the image text here.
    "idefics2": Template(
        "idefics2",
        user_prefix="User:",
        text_user_prefix="User: ",
        answer_prefix="Assistant: ",
        image_text="<fake_token_around_image><image><fake_token_around_image>",
        question_end="<end_of_utterance>\n",
        answer_suffix="<end_of_utterance>",
        image_markup="<fake_token_around_image><image><fake_token_around_image>",
    ),
    # Qwen2-VL / Qwen2.5-VL chat template (same for both), with its default system turn and no BOS token; the
    # processor expands <|image_pad|> to one token per merged patch of the image.
    "qwen2-vl": Template(
        "qwen2-vl",
        system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        user_prefix="<|im_start|>user\n",
        answer_prefix="<|im_start|>assistant\n",
        image_text="<|vision_start|><|image_pad|><|vision_end|>",
        question_end="<|im_end|>\n",
        answer_suffix="<|im_end|>",
        image_token="<|image_pad|>",
        prepend_bos=False,
        image_markup="<|vision_start|><|image_pad|><|vision_end|>",
    ),
}
TEMPLATES["demo"] = TEMPLATES[
    "llava-1.5"
]  # the tiny demo model speaks LLaVA-1.5 so the real path is exercised

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
IMAGE_TOKEN = "<image>"


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise KeyError(f"unknown template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def load_tokenizer(path: str | Path):
    """The checkpoint's own tokenizer from a local folder (no network)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:  # what transformers raises for a folder without (readable) tokenizer files
        raise InputError("no tokenizer that transformers can load: needs tokenizer.json, or tokenizer.model with "
                         "tokenizer_config.json (copy the base model's, or point config.model.path at the base "
                         "model; --verbosity=1 shows transformers' own error)", file=path) from err


def template_markers(template: Template) -> list[str]:
    """The template's `<...>` / `<|...|>` markers (image token first): real checkpoints' tokenizers have each as
    one special token, so a demo tokenizer must too."""
    text = "".join([template.image_token, template.system, template.user_prefix, template.text_user_prefix or "",
                    template.image_text, template.question_end, template.answer_prefix, template.answer_suffix])
    return list(dict.fromkeys(re.findall(r"<\|?[A-Za-z_]+\|?>", text)))


def train_demo_tokenizer(corpus: list[str], out_dir: str | Path, vocab_size: int = 512,
                         template: Template | None = None):
    """Train a byte-level BPE on `corpus` and save it as a PreTrainedTokenizerFast that AutoTokenizer
    loads.

    Byte-level means every string is encodable without `<unk>`; the template's image token and turn markers
    are added special tokens so each is one id (the image token is saved as `image_token`). BOS is added by
    the post-processor for plain `tokenizer(text)` calls.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    markers = template_markers(template) if template is not None else [IMAGE_TOKEN]
    basic = [SPECIAL_TOKENS[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")]
    specials = basic + [m for m in markers if m not in basic]
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sorted(set(corpus)) + [VICUNA_SYSTEM], trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, extra_special_tokens={"image_token": markers[0]}, **SPECIAL_TOKENS
    )
    fast.save_pretrained(str(out_dir))
    return fast
