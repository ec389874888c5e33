"""TextStream: incremental text for one choice, stop strings cut exactly."""
from services.gateway.text_stream import TextStream


def test_stop_strings_cut_exactly(smollm2_engine):
    tok = smollm2_engine.tokenizer
    ids = tok.encode("alpha beta gamma delta epsilon")
    s = TextStream(tok, [], stop=["gamma"])
    text = ""
    for i in ids:
        delta, hit = s.add([i])
        text += delta
        if hit:
            break
    assert hit and text == "alpha beta "
    s = TextStream(tok, [], stop=["zeta", "ta eps"])
    text = "".join(s.add([i])[0] for i in ids)
    assert s.stopped and text == "alpha beta gamma del"


def test_incremental_detokenizer_never_emits_broken_utf8(smollm2_engine):
    tok = smollm2_engine.tokenizer
    text = "naïve café 😀 日本語 🌊!"
    ids = tok.encode(text)
    s = TextStream(tok, [], stop=[])
    deltas = [s.add([i])[0] for i in ids] + [s.add([], final=True)[0]]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
