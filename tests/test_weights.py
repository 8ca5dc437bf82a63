"""weights: OpenAI's shards and the Hugging Face folder read into a model in the right order, every
damaged file one clear error, and the random-weights writer's layout (docs/reference.md §1)."""

import json
import os

import numpy as np
import pytest
import torch

import weights
from conftest import (
    N_SPECIAL,
    TEST_DATA,
    TINY,
    TINY_HEADS,
    label,
    labelled_arrays,
    load_tiny,
    openai_order,
    our_name,
    tiny_config,
    tiny_model,
)
from model_pytorch import DoubleHeadModel, TransformerModel
from weights import (
    WeightsError,
    load_openai_pretrained_model,
    random_openai_arrays,
    write_hf_weights,
    write_openai_weights,
)


def test_shards_load_in_openai_order(tmp_path):
    order = openai_order(TINY["n_vocab"], TINY["n_ctx"], TINY["n_embd"], TINY["n_layer"])
    arrays = labelled_arrays(order)
    write_openai_weights(tmp_path, arrays)
    model = load_tiny(tiny_model(), tmp_path, n_special=N_SPECIAL)
    we = model.embed.weight.detach().numpy()
    assert np.array_equal(we[: TINY["n_vocab"]], arrays[1])
    assert np.array_equal(we[TINY["n_vocab"] + N_SPECIAL:], arrays[0])
    for k, (tf_name, _) in enumerate(order[2:], start=2):
        got = model.get_parameter(our_name(tf_name)).detach().numpy()
        assert np.array_equal(got, arrays[k].reshape(got.shape)), \
            f"{our_name(tf_name)} holds array {label(got)}, expected array {k} ({tf_name})"
    assert {our_name(n) for n, _ in order[2:]} == {n for n, _ in model.named_parameters()} - {"embed.weight"}


def test_hugging_face_names_are_transformers_module_names(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D as HFConv1D

    hf = transformers.OpenAIGPTModel(transformers.OpenAIGPTConfig(
        vocab_size=TINY["n_vocab"], n_positions=TINY["n_ctx"], n_embd=TINY["n_embd"], n_layer=TINY["n_layer"],
        n_head=TINY_HEADS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, p in enumerate(hf.parameters()):
            p.copy_(100 * k + torch.randn(p.shape, generator=g))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_tiny(tiny_model(), tmp_path, n_special=N_SPECIAL)

    we = model.embed.weight
    assert torch.equal(we[: TINY["n_vocab"]], hf.tokens_embed.weight)
    assert torch.equal(we[TINY["n_vocab"] + N_SPECIAL:], hf.positions_embed.weight)
    leaves = {HFConv1D: {"w": "weight", "b": "bias"}, torch.nn.LayerNorm: {"g": "weight", "b": "bias"}}
    checked = set()
    for path, module in hf.named_modules():
        for ours, theirs in leaves.get(type(module), {}).items():
            got, want = model.get_parameter(f"{path}.{ours}"), getattr(module, theirs)
            assert torch.equal(got, want), f"{path}.{ours} holds {label(got.detach())}, expected {path}.{theirs}"
            checked.add(f"{path}.{ours}")
    assert checked == {n for n, _ in model.named_parameters()} - {"embed.weight"}


def test_n_ctx_and_n_special(tiny_openai_dir, tiny_arrays):
    n_ctx, n_special, n_vocab = 9, 4, TINY["n_vocab"]
    model = TransformerModel(tiny_config(), vocab=n_vocab + n_special + n_ctx, n_ctx=n_ctx)
    load_tiny(model, tiny_openai_dir, n_ctx=n_ctx, n_special=n_special)
    we = model.embed.weight.detach().numpy()
    assert np.array_equal(we[:n_vocab], tiny_arrays[1])
    assert np.array_equal(we[n_vocab + n_special:], tiny_arrays[0][:n_ctx])
    special = we[n_vocab:n_vocab + n_special]
    assert not np.isin(special, tiny_arrays[0]).any() and not np.isin(special, tiny_arrays[1]).any()
    assert 0.005 < special.std() < 0.05  # N(0, 0.02) rows


def test_n_transfer(tiny_openai_dir, tiny_arrays):
    before = tiny_model()
    untouched = {k: v.clone() for k, v in before.state_dict().items()}
    load_tiny(before, tiny_openai_dir, n_transfer=-1)
    assert all(torch.equal(v, before.state_dict()[k]) for k, v in untouched.items())

    model = tiny_model()
    layer1 = model.h[1].attn.c_attn.w.detach().clone()
    load_tiny(model, tiny_openai_dir, n_transfer=1)
    assert np.array_equal(model.h[0].attn.c_attn.w.detach().numpy(), tiny_arrays[2][0])
    assert torch.equal(model.h[1].attn.c_attn.w, layer1)
    assert np.array_equal(model.embed.weight[: TINY["n_vocab"]].detach().numpy(), tiny_arrays[1])


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hugging_face_format_loads_the_same(tmp_path, tiny_openai_dir, tiny_arrays, fmt):
    write_hf_weights(tmp_path / fmt, tiny_arrays, TINY_HEADS, fmt=fmt)
    torch.manual_seed(3)
    a = load_tiny(tiny_model(), tiny_openai_dir)
    torch.manual_seed(3)
    b = load_tiny(tiny_model(), tmp_path / fmt)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_loads_into_double_head_model(tiny_openai_dir, tiny_arrays):
    model = load_tiny(tiny_model(cls=DoubleHeadModel), tiny_openai_dir)
    assert np.array_equal(model.transformer.h[0].ln_1.g.detach().numpy(), tiny_arrays[6])
    assert model.lm_head.decoder.weight is model.transformer.embed.weight


def expect_error(path, match, **kw):
    with pytest.raises(WeightsError, match=match):
        load_tiny(tiny_model(), path, **kw)


def test_missing_folder_has_a_hint(tmp_path):
    expect_error(tmp_path / "nowhere", r"does not exist.*model/README.md")


def test_empty_folder(tmp_path):
    expect_error(tmp_path, r"neither params_shapes.json.*nor config.json")


def test_missing_shard(tiny_openai_dir):
    os.remove(tiny_openai_dir / "params_7.npy")
    expect_error(tiny_openai_dir, r"missing: params_7.npy")


def test_extra_shard(tiny_openai_dir):
    np.save(tiny_openai_dir / "params_10.npy", np.zeros(3, np.float32))
    expect_error(tiny_openai_dir, r"unexpected: params_10.npy")


def test_truncated_shard(tiny_openai_dir):
    path = tiny_openai_dir / "params_3.npy"
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    expect_error(tiny_openai_dir, r"params_3.npy: truncated.*promises \d+ float32 values")


def test_shard_sizes_do_not_add_up(tiny_openai_dir):
    np.save(tiny_openai_dir / "params_9.npy", np.zeros(5, np.float32))
    expect_error(tiny_openai_dir, r"shards hold \d+ values in all but params_shapes.json describes \d+")


def test_non_float32_shard(tiny_openai_dir):
    path = tiny_openai_dir / "params_2.npy"
    np.save(path, np.load(path).astype(np.float64))
    expect_error(tiny_openai_dir, r"params_2.npy: expected float32 data, found float64")


def test_not_an_npy_file(tiny_openai_dir):
    (tiny_openai_dir / "params_0.npy").write_bytes(b"garbage")
    expect_error(tiny_openai_dir, r"params_0.npy: not a valid .npy file")


def test_shapes_do_not_match_config(tmp_path):
    write_openai_weights(tmp_path, n_vocab=60, n_ctx=16, n_embd=24, n_layer=2)
    expect_error(tmp_path, r"params_shapes.json: array 0 has shape \[16, 24\] but a model with "
                           r"n_embd=32 expects \[16, 32\]")


def test_vocab_rows_do_not_match(tiny_openai_dir):
    model = TransformerModel(tiny_config(), vocab=100, n_ctx=16)
    with pytest.raises(WeightsError, match=r"60 token \+ 3 special \+ 16 position rows = 79.*has 100 rows"):
        load_tiny(model, tiny_openai_dir, n_special=3)


def test_n_ctx_beyond_position_table(tiny_openai_dir):
    model = TransformerModel(tiny_config(), vocab=60 + 32, n_ctx=32)
    with pytest.raises(WeightsError, match=r"n_ctx=32 but the position table has only 16 rows"):
        load_tiny(model, tiny_openai_dir)


def test_too_few_layers_in_file(tmp_path):
    write_openai_weights(tmp_path, n_vocab=60, n_ctx=16, n_embd=32, n_layer=1)
    expect_error(tmp_path, r"n_transfer=2 but the weights hold only 1 layers")


def test_hf_wrong_shape_and_dtype(tmp_path, tiny_arrays):
    bad = list(tiny_arrays)
    bad[2] = bad[2][:, :, :48]  # layer 0 c_attn.w cut short
    write_hf_weights(tmp_path / "shape", bad, TINY_HEADS)
    expect_error(tmp_path / "shape", r"'h.0.attn.c_attn.weight' has shape \[32, 48\], expected \[32, 96\]")
    bad = [a.astype(np.float16) if i == 3 else a for i, a in enumerate(tiny_arrays)]
    write_hf_weights(tmp_path / "dtype", bad, TINY_HEADS)
    expect_error(tmp_path / "dtype", r"'h.0.attn.c_attn.bias' is torch.float16, expected torch.float32")


def test_hf_missing_weights_file(tmp_path, tiny_arrays):
    write_hf_weights(tmp_path, tiny_arrays, TINY_HEADS)
    os.remove(tmp_path / "model.safetensors")
    expect_error(tmp_path, r"neither model.safetensors nor pytorch_model.bin")


def test_fixture_shapes_match_the_real_file():
    real = json.loads((TEST_DATA / "params_shapes.json").read_text())  # OpenAI's file (model/README.md)
    assert real == [list(shape) for _, shape in openai_order(40478, 512, 768, 12)]
    assert real == weights.openai_shapes()
    assert sum(int(np.prod(s)) for s in real) == 116_534_784
    assert [list(a.shape) for a in random_openai_arrays(n_layer=1, seed=0)] == real[:14]


def test_special_rows_argument_of_the_loader(tiny_openai_dir):
    n_vocab, n_ctx = TINY["n_vocab"], TINY["n_ctx"]
    model = TransformerModel(tiny_config(), vocab=n_vocab + 3 + n_ctx, n_ctx=n_ctx)
    rows = lambda: model.embed.weight[n_vocab:n_vocab + 3].detach().numpy().copy()
    load_openai_pretrained_model(model, n_special=3, n_transfer=2, n_embd=32, path=tiny_openai_dir,
                                 special_rows=np.random.RandomState(42))
    np.testing.assert_array_equal(rows(), (np.random.RandomState(42).randn(3, 32) * 0.02).astype(np.float32))
    values = np.arange(96, dtype=np.float32).reshape(3, 32)
    load_openai_pretrained_model(model, n_special=3, n_transfer=2, n_embd=32, path=tiny_openai_dir, special_rows=values)
    np.testing.assert_array_equal(rows(), values)
    torch.manual_seed(3)
    load_openai_pretrained_model(model, n_special=3, n_transfer=2, n_embd=32, path=tiny_openai_dir)  # torch's generator
    torch.manual_seed(3)
    np.testing.assert_array_equal(rows(), torch.empty(3, 32).normal_(std=0.02).numpy())


@pytest.mark.parametrize("content, message", [
    (b"[[16, 32], [60", r"params_shapes.json, line 1, column 15: not valid JSON"),
    (b"[[16, 32]]\xff", r"params_shapes.json, line 1, column 11: not UTF-8 text \(byte 0xff"),
    (b'{"shapes": 1}', r"params_shapes.json: not a JSON list of shapes"),
])
def test_a_damaged_shapes_file_is_one_line(tiny_openai_dir, content, message):
    (tiny_openai_dir / "params_shapes.json").write_bytes(content)
    expect_error(tiny_openai_dir, message)
