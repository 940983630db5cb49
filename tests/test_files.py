from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreamartist_ext.files import (
    EMBEDDING_KEY,
    LoraLayer,
    atomic_write,
    decode_metadata,
    encode_metadata,
    flatten_optimizer_state,
    generator_state_tensor,
    load_embedding,
    load_lora,
    load_training_state,
    restore_generator,
    restore_rng_states,
    rng_state_tensors,
    save_embedding,
    save_lora,
    save_safetensors_atomic,
    save_training_state,
    unflatten_optimizer_state,
)

UNET_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TE_FC1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def listing(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def random_layers(seed: int = 0) -> dict[str, LoraLayer]:
    generator = torch.Generator().manual_seed(seed)
    return {
        UNET_Q: LoraLayer(torch.randn(4, 320, generator=generator), torch.randn(320, 4, generator=generator), 2.0),
        TE_FC1: LoraLayer(torch.randn(8, 768, generator=generator), torch.randn(3072, 8, generator=generator), 8.0),
    }


# --- atomic writes -------------------------------------------------------------------------------------------


def test_atomic_write_creates_file_and_leaves_no_temp(tmp_path):
    target = atomic_write(tmp_path / "out.bin", lambda temp: temp.write_bytes(b"hello"))
    assert target == tmp_path / "out.bin"
    assert listing(tmp_path) == {"out.bin": b"hello"}


def test_atomic_write_final_file_gets_umask_permissions_not_0600(tmp_path):
    if os.name != "posix":
        pytest.skip("permission bits are POSIX")
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "out.bin", lambda temp: temp.write_bytes(b"x"))
    finally:
        os.umask(umask)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_interrupted_write_keeps_old_file_and_removes_temp(tmp_path, interruption):
    target = tmp_path / "cat.safetensors"
    save_embedding(target, torch.randn(3, 768), {"step": 100})
    before = listing(tmp_path)

    def write_half_then_fail(temp: Path) -> None:
        temp.write_bytes(b"partial safetensors header ...")
        raise interruption("interrupted mid-save")

    with pytest.raises(interruption):
        atomic_write(target, write_half_then_fail)
    assert listing(tmp_path) == before  # old file byte-identical, no temp left
    vectors, metadata = load_embedding(target)
    assert metadata["step"] == 100 and vectors.shape == (3, 768)


def test_safetensors_save_copes_with_views_sharing_storage_and_checks_metadata(tmp_path):
    base = torch.arange(12.0)
    tensors = {"head": base[:6], "tail": base[6:].view(2, 3), "transposed": base.view(3, 4).t()}
    path = save_safetensors_atomic(tmp_path / "views.safetensors", tensors, {"k": "v"})
    with safe_open(str(path), framework="pt") as reader:
        assert reader.metadata() == {"k": "v"}
        assert all(torch.equal(reader.get_tensor(name), tensor) for name, tensor in tensors.items())
    with pytest.raises(TypeError):
        save_safetensors_atomic(tmp_path / "bad.safetensors", tensors, {"k": 1})  # type: ignore[dict-item]
    assert list(listing(tmp_path)) == ["views.safetensors"]


# --- metadata ------------------------------------------------------------------------------------------------


def test_metadata_round_trip_is_exact_for_json_values_and_look_alike_strings():
    values = {
        "name": "cat",
        "step": 1200,
        "lr": 0.0025,
        "flag": True,
        "nothing": None,
        "words": ["girl", "*"],
        "nested": {"b": 1, "a": [1.5, 2]},
        "digits_as_text": "4",
        "true_as_text": "true",
        "quoted_text": '"x"',
        "empty": "",
    }
    encoded = encode_metadata(values)
    assert all(isinstance(value, str) for value in encoded.values())
    assert encoded["name"] == "cat"  # plain strings stay readable
    assert encoded["step"] == "1200"
    assert encoded["nested"] == '{"a": [1.5, 2], "b": 1}'  # sorted keys
    assert decode_metadata(encoded) == values


def test_decode_metadata_reads_foreign_plain_strings():
    assert decode_metadata({"ss_output_name": "my lora", "ss_network_dim": "16"}) == {
        "ss_output_name": "my lora",
        "ss_network_dim": 16,
    }


def test_encode_metadata_refuses_non_string_keys_and_unserialisable_values():
    with pytest.raises(TypeError):
        encode_metadata({1: "x"})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        encode_metadata({"path": object()})


# --- embeddings ----------------------------------------------------------------------------------------------


def test_embedding_round_trip_is_bit_exact_with_metadata(tmp_path):
    vectors = torch.randn(3, 768, dtype=torch.float32)
    metadata = {"name": "cat", "step": 250, "init_words": ["girl"], "neg": False}
    path = save_embedding(tmp_path / "cat.safetensors", vectors, metadata)

    loaded, loaded_metadata = load_embedding(path)
    assert torch.equal(loaded, vectors)
    assert loaded.dtype == torch.float32
    assert loaded_metadata == {**metadata, "format": "dreamartist-embedding/1"}
    with safe_open(str(path), framework="pt") as reader:  # the host needs exactly one tensor
        assert list(reader.keys()) == [EMBEDDING_KEY]


def test_embedding_is_stored_float32_contiguous_from_other_dtypes_and_views(tmp_path):
    base = torch.randn(768, 4, dtype=torch.float64)
    view = base.t()[:2]  # non-contiguous float64 view
    save_embedding(tmp_path / "x.safetensors", view, {})
    loaded, _ = load_embedding(tmp_path / "x.safetensors")
    assert torch.equal(loaded, view.to(torch.float32))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_embedding_with_non_finite_values_is_refused_and_nothing_written(tmp_path, bad_value):
    vectors = torch.randn(2, 768)
    vectors[1, 5] = bad_value
    with pytest.raises(ValueError, match="NaN or infinite"):
        save_embedding(tmp_path / "bad.safetensors", vectors, {})
    assert listing(tmp_path) == {}


def test_embedding_overflowing_float32_is_refused(tmp_path):
    with pytest.raises(ValueError, match="NaN or infinite"):
        save_embedding(tmp_path / "big.safetensors", torch.full((1, 8), 1e300, dtype=torch.float64), {})
    assert listing(tmp_path) == {}


@pytest.mark.parametrize("shape", [(768,), (1, 2, 768), (0, 768)])
def test_embedding_with_wrong_rank_is_refused(tmp_path, shape):
    with pytest.raises(ValueError, match=r"\[n_vectors, dim\]"):
        save_embedding(tmp_path / "bad.safetensors", torch.zeros(shape), {})
    assert listing(tmp_path) == {}


def test_embedding_must_be_named_safetensors(tmp_path):
    with pytest.raises(ValueError, match=r"\*\.safetensors"):
        save_embedding(tmp_path / "cat.pt", torch.zeros(1, 768), {})
    assert listing(tmp_path) == {}


def test_host_pt_embedding_loads_with_its_metadata(tmp_path):
    vectors = torch.randn(4, 768)
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vectors},
            "name": "cat",
            "step": 1500,
            "sd_checkpoint": "abcdef12",
            "sd_checkpoint_name": "v1-5-pruned",
        },
        tmp_path / "cat.pt",
    )
    loaded, metadata = load_embedding(tmp_path / "cat.pt")
    assert torch.equal(loaded, vectors)
    assert metadata == {"name": "cat", "step": 1500, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "v1-5-pruned"}


def test_kohya_and_diffusers_single_tensor_files_load(tmp_path):
    kohya = torch.randn(2, 768, dtype=torch.float16)
    save_file({"emb_params": kohya}, str(tmp_path / "kohya.safetensors"))
    loaded, metadata = load_embedding(tmp_path / "kohya.safetensors")
    assert torch.equal(loaded, kohya.float()) and metadata == {}

    concept = torch.randn(768)  # diffusers single-vector concept: {"<token>": [dim]}
    torch.save({"<cat-toy>": concept}, tmp_path / "learned_embeds.bin")
    loaded, _ = load_embedding(tmp_path / "learned_embeds.bin")
    assert torch.equal(loaded, concept.unsqueeze(0))


def test_sdxl_embeddings_round_trip_in_the_hosts_layout(tmp_path):
    """Rows are clip_l | clip_g side by side in the engine; the file holds one tensor per encoder (what the host,
    kohya and Forge read), bit-exactly, and foreign SDXL files load the same way."""
    vectors = torch.randn(3, 768 + 1280, generator=torch.Generator().manual_seed(1))
    path = save_embedding(tmp_path / "cat.safetensors", vectors, {"step": 7}, [("clip_l", 768), ("clip_g", 1280)])
    stored = load_file(str(path))
    assert set(stored) == {"clip_l", "clip_g"}
    assert torch.equal(stored["clip_l"], vectors[:, :768]) and torch.equal(stored["clip_g"], vectors[:, 768:])
    loaded, metadata = load_embedding(path)
    assert torch.equal(loaded, vectors) and metadata["step"] == 7
    foreign = tmp_path / "xl.safetensors"
    save_file({"clip_g": torch.ones(2, 1280), "clip_l": torch.zeros(2, 768)}, str(foreign))
    loaded, _ = load_embedding(foreign)
    assert loaded.shape == (2, 2048) and loaded[:, :768].eq(0).all() and loaded[:, 768:].eq(1).all()


def test_bad_sdxl_embeddings_are_refused(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, str(path))
    with pytest.raises(ValueError, match="clip_l has 2 vectors but clip_g 3") as raised:
        load_embedding(path)
    assert str(path) in str(raised.value)
    with pytest.raises(ValueError, match="add up to 2048"):
        save_embedding(tmp_path / "w.safetensors", torch.zeros(1, 100), {}, [("clip_l", 768), ("clip_g", 1280)])


@pytest.mark.parametrize(
    "filename, writer",
    [
        ("two.safetensors", lambda p: save_file({"a": torch.zeros(1, 768), "b": torch.zeros(1, 768)}, str(p))),
        ("garbage.safetensors", lambda p: p.write_bytes(b"this is not a safetensors file at all")),
        ("ints.safetensors", lambda p: save_file({"emb_params": torch.zeros(1, 768, dtype=torch.int64)}, str(p))),
        ("garbage.pt", lambda p: p.write_bytes(b"not a pickle")),
        ("two_params.pt", lambda p: torch.save({"string_to_param": {"*": torch.zeros(1, 8), "#": torch.zeros(1, 8)}}, p)),
        ("list.pt", lambda p: torch.save([torch.zeros(1, 8)], p)),
        ("image.png", lambda p: p.write_bytes(b"\x89PNG")),
    ],
)
def test_bad_embedding_files_give_value_error_naming_the_file(tmp_path, filename, writer):
    path = tmp_path / filename
    writer(path)
    with pytest.raises(ValueError) as raised:
        load_embedding(path)
    assert str(path) in str(raised.value)


def test_pt_with_arbitrary_pickled_objects_is_not_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 8)}, "obj": Path("/etc/passwd")}, path)
    with pytest.raises(ValueError, match="cannot be read") as raised:
        load_embedding(path)
    assert str(path) in str(raised.value)


def test_missing_embedding_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_embedding(tmp_path / "absent.safetensors")


# --- LoRA ----------------------------------------------------------------------------------------------------


def test_lora_round_trip_is_bit_exact_with_kohya_keys_and_metadata(tmp_path):
    layers = random_layers()
    path = save_lora(tmp_path / "cat.safetensors", layers, {"concept": "cat", "branch": "positive", "steps": 800})

    with safe_open(str(path), framework="pt") as reader:
        keys = set(reader.keys())
        raw_metadata = reader.metadata()
        alpha = reader.get_tensor(f"{UNET_Q}.alpha")
    assert keys == {f"{prefix}.{suffix}" for prefix in layers for suffix in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert alpha.ndim == 0 and alpha.dtype == torch.float32 and float(alpha) == 2.0
    assert raw_metadata["ss_network_module"] == "networks.lora"
    assert raw_metadata["ss_network_dim"] == "Dynamic"  # ranks 4 and 8 differ
    assert raw_metadata["ss_base_model_version"] == "sd_v1"
    assert raw_metadata["ss_output_name"] == "cat"

    loaded, metadata = load_lora(path)
    assert loaded.keys() == layers.keys()
    for prefix, layer in layers.items():
        assert torch.equal(loaded[prefix].down, layer.down)
        assert torch.equal(loaded[prefix].up, layer.up)
        assert loaded[prefix].alpha == layer.alpha
    assert metadata["concept"] == "cat" and metadata["steps"] == 800


def test_lora_uniform_rank_is_written_as_number_and_dtype_is_kept(tmp_path):
    down, up = torch.randn(4, 320, dtype=torch.float16), torch.randn(320, 4, dtype=torch.float16)
    save_lora(tmp_path / "a.safetensors", {UNET_Q: LoraLayer(down, up, 4)}, {})
    loaded, metadata = load_lora(tmp_path / "a.safetensors")
    assert metadata["ss_network_dim"] == 4 and metadata["ss_network_alpha"] == 4.0
    assert loaded[UNET_Q].down.dtype == torch.float16 and torch.equal(loaded[UNET_Q].up, up)


@pytest.mark.parametrize(
    "layer, message",
    [
        (LoraLayer(torch.randn(4, 320), torch.randn(320, 5), 1.0), "expected down"),
        (LoraLayer(torch.randn(4, 320, 1, 1), torch.randn(320, 4), 1.0), "expected down"),
        (LoraLayer(torch.randn(4, 320), torch.full((320, 4), float("nan")), 1.0), "NaN or infinite"),
        (LoraLayer(torch.randn(4, 320), torch.randn(320, 4), float("inf")), "alpha"),
        (LoraLayer(torch.randn(4, 320), torch.randn(320, 4), 0.0), "alpha"),
    ],
)
def test_lora_refuses_bad_layers_and_writes_nothing(tmp_path, layer, message):
    with pytest.raises(ValueError, match=message):
        save_lora(tmp_path / "bad.safetensors", {UNET_Q: layer}, {})
    assert listing(tmp_path) == {}


@pytest.mark.parametrize("prefix", ["unet.down_blocks.0.to_q", "down_blocks_0_to_q", "lora_unet_x.y"])
def test_lora_refuses_prefixes_the_host_would_not_match(tmp_path, prefix):
    layer = LoraLayer(torch.randn(2, 8), torch.randn(8, 2), 1.0)
    with pytest.raises(ValueError, match="prefix"):
        save_lora(tmp_path / "bad.safetensors", {prefix: layer}, {})
    assert listing(tmp_path) == {}


def test_lora_peft_spelling_and_missing_alpha_load(tmp_path):
    down, up = torch.randn(4, 320), torch.randn(320, 4)
    path = tmp_path / "peft_spelling.safetensors"
    save_file({f"{UNET_Q}.lora_A.weight": down, f"{UNET_Q}.lora_B.weight": up}, str(path))
    loaded, _ = load_lora(path)
    assert torch.equal(loaded[UNET_Q].down, down) and torch.equal(loaded[UNET_Q].up, up)
    assert loaded[UNET_Q].alpha == 4.0  # no alpha: scale 1, i.e. alpha = rank


@pytest.mark.parametrize(
    "tensors",
    [
        {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8)},  # diffusers/peft layout
        {f"{UNET_Q}.hada_w1_a": torch.zeros(4, 8)},  # LyCORIS
        {f"{UNET_Q}.lora_down.weight": torch.zeros(4, 8)},  # no up
        {f"{UNET_Q}.lora_down.weight": torch.zeros(4, 8, 3, 3), f"{UNET_Q}.lora_up.weight": torch.zeros(8, 4, 1, 1)},
        {"bundle_emb.cat.string_to_param.*": torch.zeros(1, 768)},  # embeddings only
    ],
)
def test_unknown_lora_layouts_give_value_error_naming_the_file(tmp_path, tensors):
    path = tmp_path / "foreign.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError) as raised:
        load_lora(path)
    assert str(path) in str(raised.value)


def test_corrupt_lora_file_gives_value_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    save_lora(path, random_layers(), {})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError) as raised:
        load_lora(path)
    assert str(path) in str(raised.value)


# --- training state ------------------------------------------------------------------------------------------


def test_training_state_round_trip_is_bit_exact(tmp_path):
    tensors = {
        "embedding.positive": torch.randn(3, 768),
        "embedding.negative": torch.randn(6, 768, dtype=torch.bfloat16),
        "counter": torch.tensor(7, dtype=torch.int64),
        "rng.cpu": generator_state_tensor(),
    }
    state = {"step": 120, "name": "cat", "lr": 0.0025, "schedule": [[0.005, 100], [0.001, None]]}
    path = save_training_state(tmp_path / "cat.state.safetensors", tensors, state)
    loaded, loaded_state = load_training_state(path)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[key], tensors[key]) and loaded[key].dtype == tensors[key].dtype for key in tensors)
    assert loaded_state == state


def test_training_state_refuses_unserialisable_state_and_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        save_training_state(tmp_path / "s.safetensors", {"a": torch.ones(1)}, {"when": object()})
    assert listing(tmp_path) == {}


def test_foreign_file_is_not_a_training_state(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"a": torch.ones(1)}, str(path))
    with pytest.raises(ValueError, match="not a DreamArtist training state") as raised:
        load_training_state(path)
    assert str(path) in str(raised.value)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs = torch.randn(16, 8, generator=generator)
        targets = torch.randn(16, 4, generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


@pytest.mark.parametrize("amsgrad", [False, True])
def test_optimizer_state_round_trip_gives_bit_identical_steps(tmp_path, amsgrad):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.95), weight_decay=0.1, amsgrad=amsgrad)
    _train(model, optimizer, steps=3, seed=1)

    optim_tensors, optim_meta = flatten_optimizer_state(optimizer.state_dict())
    params = {f"param.{name}": value for name, value in model.state_dict().items()}
    path = save_training_state(tmp_path / "state.safetensors", {**params, **optim_tensors}, {"optimizer": optim_meta})
    json.dumps(optim_meta)  # what went into the file is plain JSON

    tensors, state = load_training_state(path)
    restored_model = torch.nn.Linear(8, 4)
    restored_model.load_state_dict({name[len("param.") :]: t for name, t in tensors.items() if name.startswith("param.")})
    restored_optimizer = torch.optim.AdamW(restored_model.parameters(), lr=1.0)  # hyperparameters come from the file
    restored_state_dict = unflatten_optimizer_state(tensors, state["optimizer"])
    restored_optimizer.load_state_dict(restored_state_dict)
    assert restored_optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    assert isinstance(restored_optimizer.param_groups[0]["betas"], tuple)
    assert restored_optimizer.param_groups[0]["lr"] == 0.01

    _train(model, optimizer, steps=3, seed=2)
    _train(restored_model, restored_optimizer, steps=3, seed=2)
    for original, restored in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(original, restored)
    for original, restored in zip(optimizer.state.values(), restored_optimizer.state.values()):
        assert torch.equal(original["exp_avg_sq"], restored["exp_avg_sq"])
        assert torch.equal(torch.as_tensor(original["step"]), torch.as_tensor(restored["step"]))


def test_optimizer_state_with_python_scalars_round_trips():
    state_dict = {
        "state": {0: {"step": 3, "exp_avg": torch.ones(2)}, 1: {"step": 3.0, "flag": None}},
        "param_groups": [{"params": [0, 1], "lr": 0.5, "betas": (0.9, 0.999), "foreach": None}],
    }
    tensors, meta = flatten_optimizer_state(state_dict, prefix="optim_te")
    assert set(tensors) == {"optim_te.0.exp_avg"}
    rebuilt = unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)))
    assert rebuilt["param_groups"] == state_dict["param_groups"]
    assert rebuilt["state"][1] == {"step": 3.0, "flag": None}
    assert rebuilt["state"][0]["step"] == 3 and torch.equal(rebuilt["state"][0]["exp_avg"], torch.ones(2))


def test_unflatten_reports_a_missing_tensor():
    tensors, meta = flatten_optimizer_state({"state": {0: {"exp_avg": torch.ones(1)}}, "param_groups": []})
    with pytest.raises(ValueError, match="optim.0.exp_avg"):
        unflatten_optimizer_state({}, meta)


def test_generator_state_round_trip_reproduces_random_numbers(tmp_path):
    generator = torch.Generator().manual_seed(1234)
    torch.randn(5, generator=generator)
    save_training_state(tmp_path / "rng.safetensors", {"rng.noise": generator_state_tensor(generator)}, {})
    expected = torch.randn(10, generator=generator)

    tensors, _ = load_training_state(tmp_path / "rng.safetensors")
    fresh = torch.Generator().manual_seed(0)
    restore_generator(tensors["rng.noise"], fresh)
    assert torch.equal(torch.randn(10, generator=fresh), expected)


def test_global_rng_states_round_trip(tmp_path):
    torch.manual_seed(99)
    states = rng_state_tensors()
    assert states["rng.cpu"].dtype == torch.uint8
    expected = torch.rand(6)
    save_training_state(tmp_path / "rng.safetensors", states, {})
    torch.manual_seed(0)
    tensors, _ = load_training_state(tmp_path / "rng.safetensors")
    restore_rng_states(tensors)
    assert torch.equal(torch.rand(6), expected)


def test_empty_tensor_file_with_metadata_is_refused_rather_than_written_unreadable(tmp_path):
    with pytest.raises(ValueError, match="at least one tensor"):
        save_training_state(tmp_path / "s.safetensors", {}, {"step": 1})
    assert listing(tmp_path) == {}
