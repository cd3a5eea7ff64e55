"""``specs convert``: OpenAI CLIP -> LongCLIP by stretching, and any format -> safetensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from factories import make_openai_state_dict, make_state_dict, openai_half, write_checkpoint
from specs_metric.cli import main
from specs_metric.errors import CheckpointError
from specs_metric.models.weights.checkpoint import read_state_dict


def _manual_stretch_fp16(p: torch.Tensor) -> torch.Tensor:
    """Guide §2's rule evaluated row by row in fp16, the reference loader's dtype."""
    p = p.half()
    rows = [p[i] for i in range(20)]
    for i in range(56):
        a, b = p[20 + i], p[21 + i]
        rows += [a, 3 * a / 4 + 1 * b / 4, 2 * a / 4 + 2 * b / 4, 1 * a / 4 + 3 * b / 4]
    rows += [p[76] + k * (p[76] - p[75]) / 4 for k in range(4)]
    return torch.stack(rows).float()


def test_openai_torchscript_to_longclip_safetensors(tmp_path, capsys):
    sd = make_openai_state_dict(seed=2)
    src = write_checkpoint(openai_half(sd), tmp_path / "ViT-T.pt", "torchscript")
    out = tmp_path / "longclip.safetensors"
    assert main(["convert", str(src), str(out)]) == 0
    assert "LongCLIP" in capsys.readouterr().out
    converted = load_file(str(out))
    expected = _manual_stretch_fp16(sd["positional_embedding"])
    assert converted["positional_embedding"].shape == (248, 64)
    assert torch.equal(converted["positional_embedding"].float(), expected)
    assert torch.equal(converted["positional_embedding_res"].float(), expected)
    for key in ("visual.conv1.weight", "token_embedding.weight", "ln_final.bias"):
        assert torch.equal(converted[key].float(), openai_half(sd)[key].float())
    assert not {"input_resolution", "context_length", "vocab_size"} & set(converted)
    # and it scores as a LongCLIP model
    import specs_metric

    scorer = specs_metric.load(out)
    assert scorer.context_length == 248
    assert scorer.embed_texts(["word " * 150]).shape == (1, 32)


def test_keep_context_and_pt_output(tmp_path):
    src = write_checkpoint(make_openai_state_dict(seed=2), tmp_path / "clip.pt", "pt")
    out = tmp_path / "clip-copy.pt"
    assert main(["convert", str(src), str(out), "--keep-context"]) == 0
    copy = torch.load(out, weights_only=True)
    assert copy["positional_embedding"].shape[0] == 77 and "positional_embedding_res" not in copy


def test_longclip_round_trips_unchanged(tmp_path):
    sd = make_state_dict(seed=4)
    src = write_checkpoint(sd, tmp_path / "m.pt", "state_dict-module")
    out = tmp_path / "m.safetensors"
    main(["convert", str(src), str(out)])
    back = read_state_dict(out)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_unreadable_input_names_the_file(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage" * 10)
    assert main(["convert", str(bad), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specs convert: error:") and "bad.pt" in err and "Traceback" not in err
    monkeypatch.setenv("SPECS_DEBUG", "1")
    with pytest.raises(CheckpointError, match="bad.pt"):
        main(["convert", str(bad), str(tmp_path / "o.safetensors")])
