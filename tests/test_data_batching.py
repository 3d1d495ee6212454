"""Templates, demo tokenizer, label masks on hand-checked examples, bucketing, host sharding, determinism."""

import dataclasses

import jax
import numpy as np
import pytest

from vlmu_jax.data import synthetic
from vlmu_jax.data.batching import (
    IGNORE,
    Example,
    ExampleSource,
    TextConfig,
    _prompt_only,
    encode,
    encode_all,
    examples_from,
    generation_rows,
    row_buckets,
    sequence_buckets,
)
from vlmu_jax.data.fiubench_prompts import roundtrip_prompts
from vlmu_jax.data.records import ImageRef
from vlmu_jax.data.templates import (
    TEMPLATES,
    get_template,
    load_tokenizer,
    template_markers,
    train_demo_tokenizer,
)

N_IMG = 5


@pytest.fixture(scope="module")
def bench():
    return synthetic.make_benchmark(8, 1, 16, "mllmu")


@pytest.fixture(scope="module")
def tok(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_demo_tokenizer(synthetic.corpus(bench), out, vocab_size=600)
    return load_tokenizer(out)


def _cfg(tok, name="demo", **kw):
    return TextConfig(tok, get_template(name), tok.convert_tokens_to_ids("<image>"), N_IMG, **kw)


def test_demo_tokenizer_covers_corpus_without_unk(bench, tok):
    assert {tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token} == {"<s>", "</s>", "<pad>", "<unk>"}
    for text in synthetic.corpus(bench):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == text
    assert tok("Hi")["input_ids"][0] == tok.bos_token_id
    assert len(tok("<image>", add_special_tokens=False)["input_ids"]) == 1


def test_vicuna_mask_hand_checked(tok):
    ex = Example("Where was this person born?", "Born in Oslo.", ImageRef(data=b""))
    row = encode(ex, _cfg(tok))
    image_id = tok.convert_tokens_to_ids("<image>")
    ids, labels = row.input_ids.tolist(), row.labels.tolist()
    assert ids[0] == tok.bos_token_id and ids.count(image_id) == N_IMG
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    prompt = tok.decode(ids[1:first]).replace("<image>" * N_IMG, "<image>")
    # The prompt's trailing space merges into the first answer token ("ĠBorn"): that token carries answer
    # text.
    assert prompt + tok.decode(ids[first:]) == TEMPLATES["llava-1.5"].prompt(ex.question) + "Born in Oslo."
    assert tok.decode(ids[first:]) == " Born in Oslo." and labels[first:] == ids[first:]
    assert all(lab == IGNORE for lab in labels[:first])
    # FIUBench's own arithmetic (preprocess_v1) gives the same mask on this template, and no EOS is appended.
    assert encode(ex, _cfg(tok, fiubench_original_mask=True)).labels.tolist() == labels
    eos = encode(ex, _cfg(tok, append_eos=True))
    assert eos.input_ids[-1] == tok.eos_token_id and eos.labels[-1] == tok.eos_token_id


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_labels_exactly_answer_and_turn_end(bench, tmp_path, name):
    template = get_template(name)
    train_demo_tokenizer(synthetic.corpus(bench), tmp_path, 600, template)
    tok = load_tokenizer(tmp_path)
    image_id = tok.convert_tokens_to_ids(template.image_token)
    markers = template_markers(template)
    assert all(len(tok(m, add_special_tokens=False)["input_ids"]) == 1 for m in markers)
    for image in (ImageRef(data=b""), None):
        ex = Example("What is the job of Ada Moss?", "Works as a baker.", image)
        cfg = TextConfig(tok, template, image_id, N_IMG)
        row = encode(ex, cfg)
        answer_ids = row.input_ids[row.labels != IGNORE]
        assert tok.decode(answer_ids).lstrip(" ") == "Works as a baker." + template.answer_suffix
        assert int((row.input_ids == image_id).sum()) == (N_IMG if image is not None else 0)
        # MLLMU finetune: only pad (and image) masked
        full = encode(ex, dataclasses.replace(cfg, train_on_prompt=True))
        assert ((full.labels == IGNORE) == (full.input_ids == image_id)).all()


def _source(tok, bench, process_index, process_count, **kw):
    rows = [encode(e, _cfg(tok)) for e in examples_from(bench.identities)]
    return ExampleSource(
        rows,
        global_batch_size=4,
        pad_token_id=tok.pad_token_id,
        image_fn=lambda ref: {"pixel_values": np.full((3, 4, 4), 0 if ref is None else len(ref.read_bytes()) % 7,
                                                      np.float32)},
        buckets=(64, 128, 256),
        seed=7,
        process_index=process_index,
        process_count=process_count,
        **kw,
    )


def test_batch_shapes_and_padding(tok, bench):
    src = _source(tok, bench, 0, 1)
    assert len(src) == -(-len(src.rows) // 4)
    batch = src.get(0)
    t = batch["input_ids"].shape[1]
    assert t in (64, 128, 256)
    shapes = {"/".join(str(k.key) for k in path): (v.shape, v.dtype) for path, v in
              jax.tree_util.tree_flatten_with_path(batch)[0]}
    assert shapes == {
        "input_ids": ((4, t), np.int32),
        "attention_mask": ((4, t), np.int32),
        "labels": ((4, t), np.int32),
        "images/pixel_values": ((4, 3, 4, 4), np.float32),
    }
    pad = batch["attention_mask"] == 0
    assert (batch["input_ids"][pad] == tok.pad_token_id).all() and (batch["labels"][pad] == IGNORE).all()
    assert (batch["attention_mask"][:, 0] == 1).all()  # right padded


def test_two_hosts_get_disjoint_complete_shards(tok, bench):
    one, h0, h1 = _source(tok, bench, 0, 1), _source(tok, bench, 0, 2), _source(tok, bench, 1, 2)
    for step in (0, 3, len(one) + 1):
        full, a, b = one.get(step), h0.get(step), h1.get(step)
        assert a["input_ids"].shape[0] == b["input_ids"].shape[0] == 2
        rows = np.concatenate([h0.global_indices(step)[h0.host], h1.global_indices(step)[h1.host]])
        assert rows.tolist() == one.global_indices(step).tolist() and len(set(rows.tolist())) == 4
        t = full["input_ids"].shape[1]
        np.testing.assert_array_equal(
            np.concatenate([a["labels"][:, :t], b["labels"][:, :t]])[:, :t].shape, full["labels"].shape
        )
    epoch = np.concatenate([one.global_indices(i) for i in range(len(one))])
    assert set(epoch.tolist()) == set(range(len(one.rows)))  # complete epoch


def test_order_deterministic_and_reshuffled_per_epoch(tok, bench):
    a, b = _source(tok, bench, 0, 1), _source(tok, bench, 0, 1)
    jax.tree.map(np.testing.assert_array_equal, a.get(5), b.get(5))
    assert a.global_indices(0).tolist() != a.global_indices(len(a)).tolist()
    assert _source(tok, bench, 0, 1, shuffle=False).global_indices(0).tolist() == [0, 1, 2, 3]


def test_left_padded_generation_prompts(tok, bench):
    exs = examples_from(bench.identities[:1], field="generation", modality=None)
    rows = generation_rows(exs, _cfg(tok))
    src = ExampleSource(
        rows,
        global_batch_size=len(rows),
        pad_token_id=tok.pad_token_id,
        image_fn=lambda ref: {"pixel_values": np.full((3, 2, 2), ref is not None, np.float32)},
        shuffle=False,
        left_pad=True,
        process_index=0,
        process_count=1,
    )
    batch = src.get(0)
    assert (batch["attention_mask"][:, -1] == 1).all()
    ids = batch["input_ids"][0][batch["attention_mask"][0] == 1]
    assert tok.decode(ids[1:]).endswith(" ASSISTANT: ") and (rows[0].labels == IGNORE).all()
    text_only = [i for i, e in enumerate(exs) if e.image is None]
    assert text_only and (batch["images"]["pixel_values"][text_only] == 0).all()


def test_buckets_follow_max_length_and_image_tokens(tok, bench):
    """LLaVA-1.5 at FIUBench's max_length: 576 image tokens shift the ladder instead of overflowing it."""
    assert sequence_buckets(512, 576) == (64, 128, 256, 512, 640, 704, 832, 1088)
    assert sequence_buckets(100) == (64, 128)  # text only, cut at max_length (rounded to an even tile)
    cfg = dataclasses.replace(_cfg(tok), num_image_tokens=576, max_length=40)
    exs = examples_from(bench.identities, modality=None)
    rows = [encode(e, cfg) for e in exs]
    buckets = row_buckets(rows)
    assert max(buckets) <= max(sequence_buckets(40, 576))  # rows are cut at max_length + the expansion
    src = ExampleSource(rows, global_batch_size=4, pad_token_id=tok.pad_token_id, shuffle=False,
                        image_fn=lambda ref: {"pixel_values": np.zeros((3, 2, 2), np.float32)},
                        process_index=0, process_count=1)
    for i in range(len(src)):
        lengths = [len(rows[j].input_ids) for j in src.global_indices(i)]
        t = src.get(i)["input_ids"].shape[1]
        assert t in buckets and t >= max(lengths) and t % 64 == 0
        with_image = any(rows[j].image_tokens for j in src.global_indices(i))
        assert t - max(lengths) < (64 if with_image else 128)  # an image row never lands in a text-sized gap


def test_idk_answers_replace_forget_answers(bench):
    exs = examples_from(bench.identities[:2], idk=synthetic.IDK, seed=3)
    assert all(e.answer in synthetic.IDK for e in exs)
    assert exs == examples_from(bench.identities[:2], idk=synthetic.IDK, seed=3)


def _expanded(ids, image_id):
    return [t for i in ids for t in ([i] * N_IMG if i == image_id else [i])]


def test_fiubench_original_mask_labels_the_space_before_a_digit(tok):
    """preprocess_v1 masks BOS + len(tok(instruction + " ASSISTANT: ")) - 2 tokens. The tag's trailing space is a
    token of its own there ('Ġ') and, before a digit, in the row too, so the count stops one short: that space is
    labelled. The corrected mask starts at the first token carrying answer characters."""
    ex = Example("When was this person born?", "1990 is the year.", ImageRef(data=b""))
    orig, ours = encode(ex, _cfg(tok, fiubench_original_mask=True)), encode(ex, _cfg(tok))
    assert orig.input_ids.tolist() == ours.input_ids.tolist()
    first = int(np.flatnonzero(orig.labels != IGNORE)[0])
    assert orig.input_ids[first] == tok.convert_tokens_to_ids("Ġ")
    assert tok.convert_ids_to_tokens(orig.input_ids[first - 1:first + 2].tolist()) == [":", "Ġ", "1"]
    assert int(np.flatnonzero(ours.labels != IGNORE)[0]) == first + 1
    assert orig.labels[first + 1:].tolist() == ours.labels[first + 1:].tolist()
    assert tok.decode(orig.input_ids[orig.labels != IGNORE]) == " 1990 is the year."
    assert tok.decode(ours.input_ids[ours.labels != IGNORE]) == "1990 is the year."


def test_fiubench_generation_prompt_has_two_bos(tok, bench, tmp_path):
    """run_generation decodes the row with special tokens ("<s>..."), cuts at the answer tag and re-encodes with
    special tokens: BOS + the text's own "<s>" = two BOS; the reference is the decoded answer."""
    image_id = tok.convert_tokens_to_ids("<image>")
    ex = Example("Where was this person born?", "Born in Oslo.", ImageRef(data=b""))
    prompt = TEMPLATES["llava-1.5"].prompt(ex.question)
    got = roundtrip_prompts([ex], _cfg(tok))[0]
    assert got.prompt == "<s>" + prompt and got.reference == "Born in Oslo."
    body = tok(prompt, add_special_tokens=False)["input_ids"]
    assert got.row.input_ids.tolist() == _expanded([tok.bos_token_id, tok.bos_token_id, *body], image_id)
    assert (got.row.labels == IGNORE).all()
    ours = generation_rows([Example(ex.question, "", ex.image)], _cfg(tok))[0]
    assert ours.input_ids.tolist() == _expanded([tok.bos_token_id, *body], image_id)
    # The tag loses its newlines before the cut: Llama-3.2-Vision's prompt ends without "\n\n".
    template = get_template("llama-3.2-vision")
    train_demo_tokenizer(synthetic.corpus(bench), tmp_path, 600, template)
    tok32 = load_tokenizer(tmp_path)
    cfg32 = TextConfig(tok32, template, tok32.convert_tokens_to_ids(template.image_token), N_IMG)
    got32 = roundtrip_prompts([ex], cfg32)[0]
    assert got32.prompt == "<s>" + template.prompt(ex.question).removesuffix("\n\n")
    assert got32.reference == "\n\nBorn in Oslo.<|eot_id|>"  # strip(" ") keeps the tag's newlines


@pytest.mark.parametrize("original_mask", [False, True])
def test_rows_tokenised_in_one_call_equal_rows_tokenised_alone(tok, bench, original_mask):
    """`encode_all` (every distinct text in one tokenizer call) gives each example the ids and labels `encode`
    gives it alone: rows with and without the image, texts repeated, the original FIUBench mask (which tokenises
    the instruction apart) and the corrected one; generation prompts and FIUBench's round-trip prompts the same."""
    cfg = _cfg(tok, fiubench_original_mask=original_mask)
    examples = examples_from(bench.identities[:3])
    examples += [dataclasses.replace(e, image=None) for e in examples[:4]] + examples[:2]
    assert len({e.image is None for e in examples}) == 2
    calls = []
    real = cfg.tokenizer.__call__

    class Counted:
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, *args, **kwargs):
            calls.append(args[0])
            return real(*args, **kwargs)

    together = encode_all(examples, dataclasses.replace(cfg, tokenizer=Counted()))
    assert len(calls) == 1 and isinstance(calls[0], list)
    assert len(calls[0]) == len(set(calls[0])) < len(examples) * (1 + original_mask)
    for row, alone in zip(together, (encode(e, cfg) for e in examples), strict=True):
        assert row.input_ids.tolist() == alone.input_ids.tolist()
        assert row.labels.tolist() == alone.labels.tolist()
        assert (row.labels != IGNORE).any()
    prompts, prompt_cfg = generation_rows(examples, cfg), _prompt_only(cfg)
    alone = [encode(dataclasses.replace(e, answer=""), prompt_cfg) for e in examples]
    assert [p.input_ids.tolist() for p in prompts] == [a.input_ids.tolist() for a in alone]
    # FIUBench's round-trip prompts (decoded rows, cut at the tag, tokenised again) alike, example by example
    together = roundtrip_prompts(examples, cfg)
    for got, e in zip(together, examples, strict=True):
        one = roundtrip_prompts([e], cfg)[0]
        assert (got.prompt, got.reference, got.row.input_ids.tolist()) == (one.prompt, one.reference,
                                                                           one.row.input_ids.tolist())
    assert len({g.prompt for g in together}) > 1
