"""Untrusted model descriptions: every field the loader reads is checked for type and range
before anything is built, and a bad one is one line naming the file and the field.

Covers HF ``config.json`` / ``preprocessor_config.json`` / shard indexes, safetensors headers
and their recorded config, ``--arch`` files and ``open_clip_config.json``, and the model size a
file's keys imply (extra layer keys must not make the loader build a huge model). Each bad
file is loaded with :class:`~specs_metric.models.model.LongCLIP` made to fail if constructed, so a
refusal is shown to come before the model is allocated.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import factories
import specs_metric
from specs_metric.cli import main
from specs_metric.errors import CheckpointError, ConfigError
from specs_metric.limits import MAX_JSON_BYTES, MAX_LAYERS
from specs_metric.models.config import ModelConfig, config_metadata
from specs_metric.models.model import LongCLIP
from specs_metric.models.weights import limits
from specs_metric.models.weights import validation as model_files
from specs_metric.models.weights.checkpoint import save_state_dict
from specs_metric.models.weights.loading import read_checkpoint
from subprocesses import child_env

ERRORS = (CheckpointError, ConfigError)


@pytest.fixture(autouse=True)
def no_model_built(monkeypatch):
    """Any LongCLIP constructed during a test is a failure: refusals must come first."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("a LongCLIP was constructed for a file that must be refused")

    monkeypatch.setattr(LongCLIP, "__init__", refuse)


def refused(path: Path, *fields: str, arch: Path | None = None, named: Path | None = None) -> str:
    """Load ``path`` as a scorer; it must be refused with one line naming the file at fault
    (``named``: by default the arch file if given, else ``path``) and every one of
    ``fields``."""
    with pytest.raises(ERRORS) as info:
        specs_metric.load(path, device="cpu", arch=arch)
    message = str(info.value)
    assert "\n" not in message
    assert str(named or arch or path) in message, message
    for field in fields:
        assert field in message, message
    return message


# ------------------------------------------------------------------------- HF folders


@pytest.fixture(scope="module")
def hf_original(tmp_path_factory):
    pytest.importorskip("transformers")
    from hf_factories import save_random_clip

    return save_random_clip(tmp_path_factory.mktemp("hf") / "clip", vision_width=64,
                            text_width=64, embed_dim=32)  # fmt: skip


@pytest.fixture
def hf_folder(hf_original, tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(hf_original, folder)
    if not (folder / "preprocessor_config.json").is_file():  # save_pretrained writes none
        from specs_metric.models.weights.hf import hf_preprocessor_config
        from specs_metric.processing.preprocess import PreprocessConfig

        (folder / "preprocessor_config.json").write_text(
            json.dumps(hf_preprocessor_config(PreprocessConfig(resize=32, crop_rounding="floor")))
        )
    return folder


def edit_json(path: Path, change) -> Path:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def test_the_hf_folder_used_here_loads(hf_folder):
    checkpoint = read_checkpoint(hf_folder)
    assert checkpoint.config.vision_width == 64 and checkpoint.layout == "hf"


HF_CONFIG_CASES = {
    "num_attention_heads 0": (lambda d: d["text_config"].update(num_attention_heads=0),
                              "text_config.num_attention_heads"),
    "negative hidden_size": (lambda d: d["vision_config"].update(hidden_size=-64),
                             "vision_config.hidden_size"),
    "huge hidden_size": (lambda d: d["text_config"].update(hidden_size=10**12),
                         "text_config.hidden_size"),
    "hidden_size a float": (lambda d: d["text_config"].update(hidden_size=64.0),
                            "text_config.hidden_size"),
    "text_config a string": (lambda d: d.update(text_config="big"), "text_config"),
    "vision_config a list": (lambda d: d.update(vision_config=[1, 2]), "vision_config"),
    "empty vision_config list": (lambda d: d.update(vision_config=[]), "vision_config"),
    "huge layer count": (lambda d: d["vision_config"].update(num_hidden_layers=10**6),
                         "vision_config.num_hidden_layers"),
    "patch_size a string": (lambda d: d["vision_config"].update(patch_size="16"),
                            "vision_config.patch_size"),
    "layer_norm_eps NaN": (lambda d: d["text_config"].update(layer_norm_eps=float("nan")),
                           "text_config.layer_norm_eps"),
    "hidden_act a list": (lambda d: d["text_config"].update(hidden_act=["gelu"]),
                          "text_config.hidden_act"),
    "projection_dim true": (lambda d: d.update(projection_dim=True), "projection_dim"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HF_CONFIG_CASES))
def test_bad_hf_config_field_is_refused(case, hf_folder):
    change, field = HF_CONFIG_CASES[case]
    config = edit_json(hf_folder / "config.json", change)
    assert str(config) in refused(hf_folder, field)


PREPROCESSOR_CASES = {
    "image_mean a number": (lambda d: d.update(image_mean=0.5), "image_mean"),
    "image_mean of length 2": (lambda d: d.update(image_mean=[0.5, 0.5]), "image_mean"),
    "image_std zero": (lambda d: d.update(image_std=[0.2, 0.0, 0.2]), "image_std"),
    "size a string": (lambda d: d.update(size="224"), "size"),
    "size shortest_edge a string": (lambda d: d.update(size={"shortest_edge": "32"}),
                                    "size.shortest_edge"),
    "crop_size negative": (lambda d: d.update(crop_size={"height": -1, "width": -1}),
                           "crop_size.height"),
    "resample a string": (lambda d: d.update(resample="bicubic"), "resample"),
    "do_resize a string": (lambda d: d.update(do_resize="false"), "do_resize"),
    "resize far above the crop": (lambda d: d.update(size={"shortest_edge": 10000}),
                                  "resize 10000"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(PREPROCESSOR_CASES))
def test_bad_preprocessor_field_is_refused(case, hf_folder):
    change, field = PREPROCESSOR_CASES[case]
    pre = edit_json(hf_folder / "preprocessor_config.json", change)
    assert str(pre) in refused(hf_folder, field)


def test_bad_preprocess_file_option_is_refused(hf_folder, tmp_path):
    pre = tmp_path / "pre.json"
    pre.write_text(json.dumps({"image_std": "0.5"}))
    with pytest.raises(ERRORS, match=f"{pre}: image_std must be a list of 3 numbers"):
        read_checkpoint(hf_folder, preprocess=pre)


def _index(folder: Path, weight_map) -> Path:
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_a_well_formed_shard_index_is_followed(hf_folder):
    from safetensors import safe_open

    with safe_open(str(hf_folder / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    (hf_folder / "model.safetensors").rename(hf_folder / "model-00001-of-00001.safetensors")
    _index(hf_folder, {k: "model-00001-of-00001.safetensors" for k in keys})
    assert read_checkpoint(hf_folder).config.text_width == 64


SHARD_CASES = {
    "weight_map a list": (["model.safetensors"], "weight_map"),
    "weight_map naming ../x": ({"logit_scale": "../x"}, "'../x'"),
    "weight_map naming /etc/passwd": ({"logit_scale": "/etc/passwd"}, "'/etc/passwd'"),
    "weight_map naming a subfolder": ({"logit_scale": "sub/model.safetensors"}, "sub/"),
    "weight_map value a number": ({"logit_scale": 3}, "weight_map['logit_scale']"),
    "weight_map naming a missing file": ({"logit_scale": "model-2.safetensors"},
                                         "'model-2.safetensors'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_bad_shard_index_is_refused(case, hf_folder):
    weight_map, field = SHARD_CASES[case]
    index = _index(hf_folder, weight_map)
    assert str(index) in refused(hf_folder, field)


def test_config_json_nested_100000_deep_is_refused(hf_folder):
    (hf_folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(hf_folder, "config.json", "nested too deeply")


def test_config_json_nested_within_the_parser_limit_is_refused(hf_folder):
    deep = json.loads("[" * 500 + "]" * 500)
    edit_json(hf_folder / "config.json", lambda d: d.update(extra=deep))
    refused(hf_folder, "config.json", "nested too deeply")


def test_oversized_config_json_is_refused_unread(hf_folder):
    path = hf_folder / "config.json"
    data = json.loads(path.read_text())
    data["padding"] = "x" * (MAX_JSON_BYTES + 1)
    path.write_text(json.dumps(data))
    refused(hf_folder, "config.json", "too large")


# ------------------------------------------------------------------- safetensors files


def _write_safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


def test_safetensors_header_nested_100000_deep_is_refused(tmp_path):
    path = _write_safetensors(tmp_path / "deep.safetensors",
                              ("[" * 100_000 + "]" * 100_000).encode())  # fmt: skip
    refused(path, "safetensors header", "nested too deeply")


def test_safetensors_metadata_nested_100000_deep_is_refused(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    header = json.dumps({"__metadata__": {"specs_model_config": deep}}).encode()
    path = _write_safetensors(tmp_path / "deep-meta.safetensors", header)
    refused(path, "__metadata__.specs_model_config", "nested too deeply")


def test_safetensors_metadata_value_that_is_not_a_string_is_refused(tmp_path):
    header = json.dumps({
        "__metadata__": {"specs_model_config": 5},
        "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }).encode()  # fmt: skip
    path = _write_safetensors(tmp_path / "meta-number.safetensors", header, bytes(4))
    refused(path, "__metadata__.specs_model_config")


def _with_recorded_config(tmp_path: Path, change) -> Path:
    state = factories.make_state_dict()
    from specs_metric.models.config import config_from_state_dict

    meta = config_metadata(config_from_state_dict(state))
    recorded = json.loads(meta["specs_model_config"])
    meta["specs_model_config"] = json.dumps(change(recorded))
    return save_state_dict(state, tmp_path / "recorded.safetensors", metadata=meta)


def test_the_recorded_config_used_here_loads(tmp_path):
    path = _with_recorded_config(tmp_path, lambda c: c)
    assert read_checkpoint(path).config.vision_layers == 1


RECORDED_CASES = {
    "a number instead of an object": (lambda c: 5, "must hold a JSON object"),
    "vision_layers a string": (lambda c: {**c, "vision_layers": "12"},
                               "specs_model_config.vision_layers"),
    "vision_layers -1": (lambda c: {**c, "vision_layers": -1}, "specs_model_config.vision_layers"),
    "head width a string": (lambda c: {**c, "vision_head_width": "64"},
                            "specs_model_config.vision_head_width"),
    "epsilon a string": (lambda c: {**c, "text_layer_norm_eps": "x"},
                         "specs_model_config.text_layer_norm_eps"),
    "activation a number": (lambda c: {**c, "activation": 1}, "specs_model_config.activation"),
    "unknown field": (lambda c: {**c, "depth": 3}, "unknown model-config fields"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(RECORDED_CASES))
def test_bad_recorded_config_is_refused(case, tmp_path):
    change, field = RECORDED_CASES[case]
    refused(_with_recorded_config(tmp_path, change), field)


def test_bad_recorded_preprocessing_is_refused(tmp_path):
    state = factories.make_state_dict()
    meta = {"specs_preprocess": json.dumps({"resize": 32, "mean": [0.5, 0.5]})}
    path = save_state_dict(state, tmp_path / "pre.safetensors", metadata=meta)
    refused(path, "__metadata__.specs_preprocess.mean")


# ------------------------------------------------------------------ layer keys and size


def _extra_layers(count: int, start: int = 1) -> dict[str, torch.Tensor]:
    """Layer keys with one-element tensors: many layers declared, almost no weights."""
    return {f"transformer.resblocks.{i}.attn.in_proj_weight": torch.zeros(1)
            for i in range(start, start + count)}  # fmt: skip


def test_5000_extra_layer_keys_are_refused_quickly(tmp_path):
    state = {**factories.make_state_dict(), **_extra_layers(5000)}
    path = save_state_dict(state, tmp_path / "layers.safetensors")
    assert path.stat().st_size < 16 << 20
    started = time.monotonic()
    refused(path, "transformer.resblocks", str(MAX_LAYERS))
    assert time.monotonic() - started < 30


def test_extra_layers_under_the_layer_limit_are_refused_by_their_size(tmp_path, monkeypatch):
    # Within the layer-count limit (and with the limit lifted) the parameter count refuses
    # them: the file's tensors cannot fill the model the keys describe.
    for count, limit in ((200, MAX_LAYERS), (5000, 10**6)):
        monkeypatch.setattr(model_files, "MAX_LAYERS", limit)
        monkeypatch.setattr(limits, "MAX_LAYERS", limit)
        state = {**factories.make_state_dict(), **_extra_layers(count)}
        path = save_state_dict(state, tmp_path / f"layers-{count}.safetensors")
        refused(path, f"{count + 1} layers", "hold only")


def test_a_layer_index_of_a_billion_is_refused(tmp_path):
    state = {**factories.make_state_dict(), **_extra_layers(1, start=10**9)}
    path = save_state_dict(state, tmp_path / "index.safetensors")
    refused(path, "transformer.resblocks.1000000000", "layer index")


def test_layer_indices_with_a_gap_are_refused(tmp_path):
    state = factories.make_state_dict()
    state.update(
        {
            k.replace("resblocks.0.", "resblocks.2."): v.clone()
            for k, v in state.items()
            if k.startswith("transformer.resblocks.0.")
        }
    )
    path = save_state_dict(state, tmp_path / "gap.safetensors")
    refused(path, "transformer.resblocks", "layer 1 is missing")


def test_hf_layer_index_of_a_billion_is_refused(hf_folder):
    from safetensors.torch import load_file, save_file

    weights = hf_folder / "model.safetensors"
    state = load_file(str(weights))
    state["text_model.encoder.layers.1000000000.self_attn.q_proj.weight"] = torch.zeros(1)
    save_file(state, str(weights), metadata={"format": "pt"})
    refused(hf_folder, "text_model.encoder.layers.1000000000", "layer index")


def test_absolute_cap_refuses_before_building(tmp_path, monkeypatch):
    path = save_state_dict(factories.make_state_dict(), tmp_path / "m.safetensors")
    monkeypatch.setenv("SPECS_MAX_CHECKPOINT_BYTES", "100000")
    refused(path, "over the limit of 100000 bytes")


def test_one_dimensional_projection_is_an_error_not_an_index_error(tmp_path):
    state = factories.make_state_dict()
    state["text_projection"] = state["text_projection"][:, 0].contiguous()
    path = save_state_dict(state, tmp_path / "flat.safetensors")
    refused(path, "text_projection", "2 dimensions")


@pytest.mark.parametrize("config", [
    ModelConfig(32, 32, 1, 64, 16, 248, 49408, 64, 1),
    ModelConfig(48, 64, 2, 96, 16, 77, 1000, 128, 3, vision_head_width=32, text_head_width=32,
                activation="gelu", vision_mlp_width=240, text_mlp_width=200),
    ModelConfig(16, 28, 1, 80, 14, 100, 300, 64, 2, vision_head_width=80, positional="plain"),
])  # fmt: skip
def test_expected_shapes_and_count_equal_the_built_models(config, monkeypatch):
    monkeypatch.undo()  # this test builds models
    model = LongCLIP(config)
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert model_files.expected_shapes(config) == built
    assert model_files.parameter_count(config) == sum(p.numel() for p in model.parameters())


def test_layer_count():
    keys = ["a.0.w", "a.1.w", "a.1.b", "a.x.w", "ab.5.w", "b.9.w"]
    assert limits.layer_count(keys, "a") == 2
    assert limits.layer_count(keys, "c") == 0
    with pytest.raises(ValueError, match="layer 1 is missing"):
        limits.layer_count(["a.0.w", "a.2.w"], "a")
    with pytest.raises(ValueError, match="beyond the limit"):
        limits.layer_count(["a.0.w", "a." + "9" * 5000 + ".w"], "a")


_MEASURE = textwrap.dedent(
    """
    import resource, sys
    import specs_metric
    from specs_metric.models.weights.checkpoint import CheckpointError
    from specs_metric.models.weights import validation as model_files
    from specs_metric.models.weights import limits
    model_files.MAX_LAYERS = limits.MAX_LAYERS = int(sys.argv[2])
    specs_metric.load  # imports torch and the loader before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        specs_metric.load(sys.argv[1], device="cpu")
        outcome = "loaded"
    except CheckpointError as exc:
        outcome = "refused: " + str(exc)
    print(f"{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024:.0f}")
    print(outcome)
    """
)


def test_5000_layer_file_is_refused_in_bounded_memory(tmp_path):
    # The layer-count limit is lifted in the child, so the size check alone has to keep
    # the model (about 1 GB at these widths) from being allocated.
    state = {**factories.make_state_dict(), **_extra_layers(5000)}
    path = save_state_dict(state, tmp_path / "layers.safetensors")
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), str(10**6)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    growth, outcome = done.stdout.splitlines()[-2:]
    assert outcome.startswith("refused") and "hold only" in outcome, outcome
    size = path.stat().st_size
    assert float(growth) < 200, f"RSS grew {growth} MB while refusing a {size}-byte file"


# ------------------------------------------------------------------- --arch and open_clip


ARCH_CASES = {
    "activation a number": ({"activation": 1}, "activation"),
    "head width a string": ({"vision_head_width": "64"}, "vision_head_width"),
    "head width zero": ({"text_head_width": 0}, "text_head_width"),
    "layers huge": ({"text_layers": 10**9}, "text_layers"),
    "epsilon negative": ({"vision_layer_norm_eps": -1e-5}, "vision_layer_norm_eps"),
    "open_clip width a string": ({"vision_cfg": {"width": "768"}}, "vision_cfg.width"),
    "open_clip heads zero": ({"text_cfg": {"width": 64, "heads": 0}}, "text_cfg.heads"),
    "open_clip vision_cfg a list": ({"vision_cfg": [], "text_cfg": {}}, "vision_cfg"),
    "open_clip mlp_ratio a string": ({"vision_cfg": {"width": 64, "mlp_ratio": "4"}},
                                     "vision_cfg.mlp_ratio"),
    "HF patch_size zero": ({"vision_config": {"patch_size": 0}}, "vision_config.patch_size"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_bad_arch_file_is_refused(case, tmp_path):
    data, field = ARCH_CASES[case]
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(data))
    path = save_state_dict(factories.make_state_dict(), tmp_path / "m.pt")
    refused(path, field, arch=arch)


def _open_clip_file(tmp_path: Path) -> tuple[Path, dict]:
    state = factories.make_openai_state_dict()
    path = save_state_dict(state, tmp_path / "open_clip_pytorch_model.bin")
    sidecar = {
        "model_cfg": {
            "embed_dim": 32, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1,
                         "layers": 1},
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }  # fmt: skip
    return path, sidecar


def test_the_open_clip_sidecar_used_here_loads(tmp_path):
    path, sidecar = _open_clip_file(tmp_path)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(sidecar))
    assert read_checkpoint(path).preprocess.mean == (0.5, 0.5, 0.5)


OPEN_CLIP_CASES = {
    "model_cfg a string": (lambda d: d.update(model_cfg="ViT-B-32"), "model_cfg"),
    "quick_gelu a string": (lambda d: d["model_cfg"].update(quick_gelu="yes"),
                            "model_cfg.quick_gelu"),
    "head_width a string": (lambda d: d["model_cfg"]["vision_cfg"].update(head_width="64"),
                            "model_cfg.vision_cfg.head_width"),
    "image_size a dict": (lambda d: d["model_cfg"]["vision_cfg"].update(image_size={"h": 1}),
                          "vision_cfg.image_size"),
    "text heads zero": (lambda d: d["model_cfg"]["text_cfg"].update(heads=0),
                        "model_cfg.text_cfg.heads"),
    "preprocess mean of two": (lambda d: d["preprocess_cfg"].update(mean=[0.5, 0.5]),
                               "preprocess_cfg.mean"),
    "preprocess size a string": (lambda d: d["preprocess_cfg"].update(size="224"),
                                 "preprocess_cfg.size"),
    "preprocess_cfg a list": (lambda d: d.update(preprocess_cfg=[1]), "preprocess_cfg"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(OPEN_CLIP_CASES))
def test_bad_open_clip_config_is_refused(case, tmp_path):
    path, sidecar = _open_clip_file(tmp_path)
    change, field = OPEN_CLIP_CASES[case]
    change(sidecar)
    config = tmp_path / "open_clip_config.json"
    config.write_text(json.dumps(sidecar))
    refused(path, field, named=config)


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("case", ["hf", "deep", "layers", "arch"])
def test_bad_model_files_are_one_line_in_the_cli(case, hf_folder, tmp_path, capsys):
    args = []
    if case == "hf":
        model = hf_folder
        edit_json(hf_folder / "config.json", lambda d: d.update(vision_config=[1]))
    elif case == "deep":
        model = _write_safetensors(
            tmp_path / "deep.safetensors", ('{"a":' * 100_000 + "1" + "}" * 100_000).encode()
        )
    elif case == "layers":
        state = {**factories.make_state_dict(), **_extra_layers(5000)}
        model = save_state_dict(state, tmp_path / "layers.safetensors")
    else:
        model = save_state_dict(factories.make_state_dict(), tmp_path / "m.pt")
        arch = tmp_path / "arch.json"
        arch.write_text(json.dumps({"vision_head_width": "64"}))
        args = ["--arch", str(arch)]
    code = main(["score", "--model", str(model), *args, "--input", "x.jsonl",
                 "--output", str(tmp_path / "o.jsonl")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("specs score: error: ")
    assert (str(arch) if case == "arch" else str(model)) in err


# ---------------------------------------------------------------------------- fuzzing

ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30),
    st.sampled_from([0, 1, 2, 3, 16, 32, 64, 77, 248, 49408, -1, 2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.integers(-3, 300), max_size=4), st.dictionaries(st.text(max_size=4),
                                                                st.integers(), max_size=2),
)  # fmt: skip
TOWER_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "vocab_size", "image_size", "patch_size",
                "hidden_act", "layer_norm_eps", "num_channels"]  # fmt: skip
TOP_FIELDS = ["projection_dim", "model_type", "text_config", "vision_config",
              "text_config_dict"]  # fmt: skip
PRE_FIELDS = ["image_mean", "image_std", "size", "crop_size", "resample", "do_resize",
              "do_normalize", "rescale_factor", "do_center_crop"]  # fmt: skip


def _edits():
    tower = st.tuples(
        st.sampled_from(["text_config", "vision_config"]), st.sampled_from(TOWER_FIELDS), ODD_VALUES
    )
    top = st.tuples(st.just(""), st.sampled_from(TOP_FIELDS), ODD_VALUES)
    return st.lists(st.one_of(tower, top), min_size=1, max_size=4)


def _apply(data: dict, edits) -> dict:
    for section, key, value in edits:
        target = data.get(section) if section else data
        if isinstance(target, dict):
            target[key] = value
    return data


@settings(max_examples=300, deadline=None)
@given(edits=_edits())
def test_fuzzed_hf_config_raises_only_config_errors(edits):
    from specs_metric.models.weights.hf import config_from_hf, hf_config

    base = hf_config(ModelConfig(32, 32, 1, 64, 16, 77, 49408, 64, 1))
    try:
        config_from_hf(_apply(base, edits))
    except ConfigError:
        pass


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.sampled_from(PRE_FIELDS), ODD_VALUES), max_size=4))
def test_fuzzed_preprocessor_config_raises_only_config_errors(edits):
    from specs_metric.models.weights.hf import hf_preprocessor_config, preprocess_from_hf
    from specs_metric.processing.preprocess import PreprocessConfig

    data = hf_preprocessor_config(PreprocessConfig(resize=32, crop_rounding="floor"))
    data.update(dict(edits))
    try:
        preprocess_from_hf(data, 32)
    except ConfigError:
        pass


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(edits=_edits(), pre=st.lists(st.tuples(st.sampled_from(PRE_FIELDS), ODD_VALUES), max_size=2))
def test_fuzzed_hf_folder_loads_or_raises_only_model_errors(hf_original, tmp_path, edits, pre):
    folder = tmp_path / "fuzz"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(hf_original, folder)
    edit_json(folder / "config.json", lambda d: _apply(d, edits))
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(pre), default=str))
    try:
        read_checkpoint(folder)
    except ERRORS:
        pass


OPEN_CLIP_FIELDS = [("", "embed_dim"), ("", "quick_gelu"), ("", "vision_cfg"), ("", "text_cfg"),
                    *[("vision_cfg", k) for k in ("image_size", "layers", "width", "patch_size",
                                                  "head_width", "mlp_ratio", "timm_model_name")],
                    *[("text_cfg", k) for k in ("context_length", "vocab_size", "width", "heads",
                                                "layers", "hf_model_name")]]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    flat=st.dictionaries(st.sampled_from(model_files.MODEL_FIELDS), ODD_VALUES, max_size=4),
    edits=st.lists(st.tuples(st.sampled_from(OPEN_CLIP_FIELDS), ODD_VALUES), max_size=4),
)
def test_fuzzed_arch_descriptions_raise_only_config_errors(flat, edits):
    from specs_metric.models.archs import arch_from_json

    sidecar = {"model_cfg": {"embed_dim": 32, "vision_cfg": {"width": 64, "layers": 1},
                             "text_cfg": {"width": 64, "heads": 1}}}  # fmt: skip
    for (section, key), value in edits:
        target = sidecar["model_cfg"].get(section) if section else sidecar["model_cfg"]
        if isinstance(target, dict):
            target[key] = value
    for data in (flat, sidecar, sidecar["model_cfg"]):
        try:
            arch_from_json(data, "arch.json")
        except ConfigError:
            pass
