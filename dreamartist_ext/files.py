"""Files we write and read: embeddings, LoRA adapters, training state.

Every tensor file we write is safetensors (the host's safe unpickler rejects ``.pt`` files from newer torch,
and pickle can run code). Every write is atomic: a half-written file never replaces a good one.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# ---------------------------------------------------------------------------------------------------------------
# Atomic writes


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Have ``write(temp_path)`` fill a temporary file beside ``path``, then move it over ``path``.

    The temporary file lives in the same directory (so ``os.replace`` is an atomic rename), is fsynced before the
    rename, and is removed if anything goes wrong -- KeyboardInterrupt included -- leaving ``path`` untouched.
    """
    target = Path(path)
    temp = _reserve_temp_path(target)
    try:
        write(temp)
        _fsync_file(temp)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)
    return target


def _reserve_temp_path(target: Path) -> Path:
    # Hidden, and ending in ".tmp" rather than ".safetensors": the host scans embeddings/ and models/Lora/ by
    # extension and must never pick up a half-written file.
    for _ in range(100):
        temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            # os.open with mode 0o666 applies the umask, so the final file gets the usual permissions
            # (tempfile.mkstemp would leave it 0600).
            descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(descriptor)
        return temp
    raise FileExistsError(f"could not create a temporary file beside {target}")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; POSIX only (Windows cannot open a directory this way).
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def save_safetensors_atomic(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` (moved to CPU, contiguous, unshared) and string ``metadata`` as one safetensors file."""
    prepared: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensors must map str to torch.Tensor, got {name!r}: {type(tensor).__name__}")
        # A copy: safetensors refuses tensors that share storage, and the caller's tensors stay untouched.
        prepared[name] = tensor.detach().to("cpu", copy=True).contiguous()
    if metadata is not None:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"safetensors metadata must map str to str, got {key!r}: {type(value).__name__}")
    if not prepared and metadata:
        # safetensors 0.4.2 writes a header it cannot read back for "metadata but no tensors".
        raise ValueError("a safetensors file with metadata must hold at least one tensor")
    metadata_copy = dict(metadata) if metadata is not None else None
    return atomic_write(path, lambda temp: save_file(prepared, str(temp), metadata=metadata_copy))


def _read_safetensors(source: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    try:
        with safe_open(str(source), framework="pt", device="cpu") as reader:
            metadata = reader.metadata() or {}
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    except SafetensorError as error:
        raise ValueError(f"{source}: not a readable safetensors file ({error})") from error
    return tensors, metadata


# ---------------------------------------------------------------------------------------------------------------
# Metadata: safetensors stores str -> str only


def encode_metadata(values: Mapping[str, Any]) -> dict[str, str]:
    """Strings stay as they are; every other value becomes sorted-keys JSON.

    A string that would itself parse as JSON ("4", "true", "null") is JSON-quoted, so that decode_metadata gives
    back a string and not a number: the round trip is exact for every JSON-serialisable value.
    """
    encoded: dict[str, str] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be strings, got {key!r}")
        if isinstance(value, str) and not _parses_as_json(value):
            encoded[key] = value
        else:
            encoded[key] = json.dumps(value, sort_keys=True)
    return encoded


def decode_metadata(meta: Mapping[str, str]) -> dict[str, Any]:
    """Inverse of encode_metadata: JSON where a value parses as JSON, the plain string otherwise."""
    decoded: dict[str, Any] = {}
    for key, text in meta.items():
        try:
            decoded[key] = json.loads(text)
        except ValueError:
            decoded[key] = text
    return decoded


def _parses_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _require_suffix(path: str | os.PathLike[str], what: str) -> Path:
    # The host chooses a loader by file extension; safetensors content under another name would fail there.
    target = Path(path)
    if target.suffix.lower() != ".safetensors":
        raise ValueError(f"{target}: a {what} file must be named *.safetensors")
    return target


def _require_finite(tensor: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{what} contains NaN or infinite values; nothing was written")


# ---------------------------------------------------------------------------------------------------------------
# Embeddings

EMBEDDING_KEY = "emb_params"  # the host loads a safetensors embedding only if it holds exactly one tensor
EMBEDDING_FORMAT = "dreamartist-embedding/1"
_HOST_PT_EXTRA_KEYS = ("string_to_param", "string_to_token")
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # in the order of the engine's concatenated rows


def save_embedding(
    path: str | os.PathLike[str],
    vectors: torch.Tensor,
    metadata: Mapping[str, Any],
    encoders: Sequence[tuple[str, int]] = (),
) -> Path:
    """Save ``vectors`` [n_vectors, dim] as float32, with metadata plus 'format'.

    One text encoder (or ``encoders`` empty): one tensor under EMBEDDING_KEY. Several (SDXL): the row is the
    encoders' vectors side by side, ``encoders`` gives (key, width) in that order, and each slice is stored
    under its key — ``{'clip_l': [n, 768], 'clip_g': [n, 1280]}``, the layout the host and kohya read.
    """
    target = _require_suffix(path, "embedding")
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
        raise ValueError("embedding vectors must be a floating-point tensor")
    if vectors.ndim != 2 or 0 in vectors.shape:
        raise ValueError(f"embedding vectors must have shape [n_vectors, dim], got {tuple(vectors.shape)}")
    # Convert first: a float64 value can be finite yet overflow float32.
    stored = vectors.detach().to("cpu", torch.float32).contiguous()
    _require_finite(stored, f"embedding for {target.name}")
    encoded = encode_metadata({**metadata, "format": EMBEDDING_FORMAT})
    if len(encoders) <= 1:
        return save_safetensors_atomic(target, {EMBEDDING_KEY: stored}, encoded)
    tensors = {key: part.contiguous() for key, part in split_by_encoder(stored, encoders).items()}
    return save_safetensors_atomic(target, tensors, encoded)


def split_by_encoder(vectors: torch.Tensor, encoders: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """A learned word's rows [n, sum of widths] as one slice per text encoder, keyed as in embedding files
    (views: gradients flow through them)."""
    if sum(width for _, width in encoders) != vectors.shape[1]:
        raise ValueError(f"embedding rows are {vectors.shape[1]} wide; the encoders {list(encoders)} add up to "
                         f"{sum(width for _, width in encoders)}")
    out, offset = {}, 0
    for key, width in encoders:
        out[key] = vectors[:, offset:offset + width]
        offset += width
    return out


def load_embedding(path: str | os.PathLike[str]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Load an embedding as float32 [n_vectors, dim] plus its metadata.

    Reads our files, any single-tensor safetensors file (kohya 'emb_params', diffusers concepts), SDXL files
    ``{'clip_l', 'clip_g'}`` (returned side by side, [n, 768 + 1280]) and the host's ``.pt``/``.bin`` format
    ``{'string_to_param': {'*': T}, ...}`` (unpickled with weights_only=True).
    """
    source = Path(path)
    suffix = source.suffix.lower()
    if suffix == ".safetensors":
        tensors, raw_metadata = _read_safetensors(source)
        metadata = decode_metadata(raw_metadata)
    elif suffix in (".pt", ".bin"):
        tensors, metadata = _read_torch_embedding(source)
    else:
        raise ValueError(f"{source}: not an embedding file (expected .safetensors, .pt or .bin)")

    if set(tensors) == set(SDXL_EMBEDDING_KEYS):
        rows = [_as_vector_rows(tensors[key], source) for key in SDXL_EMBEDDING_KEYS]
        if rows[0].shape[0] != rows[1].shape[0]:
            raise ValueError(f"{source}: clip_l has {rows[0].shape[0]} vectors but clip_g {rows[1].shape[0]}")
        return torch.cat(rows, dim=1), metadata  # the engine's SDXL row: clip_l then clip_g
    if len(tensors) != 1:
        names = ", ".join(sorted(tensors)[:5])
        raise ValueError(f"{source}: an embedding file holds exactly one tensor; this one holds {len(tensors)} ({names})")
    (tensor,) = tensors.values()
    return _as_vector_rows(tensor, source), metadata


def _read_torch_embedding(source: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    try:
        with warnings.catch_warnings():  # torch 2.1's weights_only loader warns about its own TypedStorage use
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            data = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refusals, truncated zips, not-a-pickle: all "unreadable"
        raise ValueError(f"{source}: cannot be read as a torch embedding file ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a dict, found {type(data).__name__}")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict):
            raise ValueError(f"{source}: 'string_to_param' is not a dict")
        # Only plain values (name, step, checkpoint hash/name) are metadata.
        metadata = {
            key: value
            for key, value in data.items()
            if key not in _HOST_PT_EXTRA_KEYS and (value is None or isinstance(value, (str, int, float, bool)))
        }
        return _only_tensors(params, source), metadata
    # diffusers textual-inversion .bin: {"<token>": tensor}; SDXL pairs are reported by the caller.
    return _only_tensors(data, source), {}


def _only_tensors(mapping: dict, source: Path) -> dict[str, torch.Tensor]:
    tensors = {str(key): value for key, value in mapping.items() if isinstance(value, torch.Tensor)}
    if len(tensors) != len(mapping):
        raise ValueError(f"{source}: unknown embedding layout (keys: {', '.join(map(str, list(mapping)[:5]))})")
    return tensors


def _as_vector_rows(tensor: torch.Tensor, source: Path) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise ValueError(f"{source}: embedding tensor has dtype {tensor.dtype}, expected floating point")
    if tensor.ndim == 1:  # single-vector files (older diffusers concepts) store [dim]
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or 0 in tensor.shape:
        raise ValueError(f"{source}: embedding tensor has shape {tuple(tensor.shape)}, expected [n_vectors, dim]")
    return tensor.to(torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# LoRA (kohya layout, the one the host's built-in Lora extension loads)

LORA_FORMAT = "dreamartist-lora/1"
_LORA_PART_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# kohya's ss_base_model_version per model family (our metadata's "architecture")
_KOHYA_BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_LORA_ROLES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_A.weight": "down",  # peft spelling, accepted by the host too
    "lora_B.weight": "up",
    "alpha": "alpha",
}


@dataclass
class LoraLayer:
    """One low-rank delta ``up @ down * (alpha / rank)`` on a Linear layer."""

    down: torch.Tensor  # [rank, in_features]
    up: torch.Tensor  # [out_features, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def save_lora(path: str | os.PathLike[str], layers: Mapping[str, LoraLayer], metadata: Mapping[str, Any]) -> Path:
    """Save ``layers`` (keyed by kohya prefix) as ``<prefix>.lora_down.weight / .lora_up.weight / .alpha``.

    Metadata: the caller's values plus kohya fields (ss_network_module, ss_network_dim, ss_network_alpha,
    ss_base_model_version, ss_output_name) and 'format'; the kohya fields describe the file and win over the
    caller's. Tensors keep their dtype.
    """
    target = _require_suffix(path, "LoRA")
    if not layers:
        raise ValueError("a LoRA file needs at least one layer")
    tensors: dict[str, torch.Tensor] = {}
    for prefix, layer in layers.items():
        _check_lora_layer(prefix, layer)
        tensors[f"{prefix}.lora_down.weight"] = layer.down
        tensors[f"{prefix}.lora_up.weight"] = layer.up
        tensors[f"{prefix}.alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)

    ranks = {layer.rank for layer in layers.values()}
    alphas = {float(layer.alpha) for layer in layers.values()}
    kohya_fields = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": ranks.pop() if len(ranks) == 1 else "Dynamic",  # kohya's word for mixed ranks
        "ss_network_alpha": alphas.pop() if len(alphas) == 1 else "Dynamic",
        "ss_base_model_version": _KOHYA_BASE_VERSIONS.get(str(metadata.get("architecture", "sd1")), "sd_v1"),
        "ss_output_name": target.stem,
        "format": LORA_FORMAT,
    }
    return save_safetensors_atomic(target, tensors, encode_metadata({**metadata, **kohya_fields}))


def _check_lora_layer(prefix: str, layer: LoraLayer) -> None:
    # The host splits keys at the first '.', so a prefix must not contain one.
    if not isinstance(prefix, str) or "." in prefix or not prefix.startswith(_LORA_PART_PREFIXES):
        raise ValueError(f"LoRA prefix {prefix!r} must start with one of {', '.join(_LORA_PART_PREFIXES)} and "
                         "contain no '.'")
    down, up = layer.down, layer.up
    if not (isinstance(down, torch.Tensor) and isinstance(up, torch.Tensor)):
        raise TypeError(f"LoRA layer {prefix}: down and up must be tensors")
    if not (down.is_floating_point() and up.is_floating_point()):
        raise ValueError(f"LoRA layer {prefix}: down and up must be floating point")
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] == 0 or up.shape[1] != down.shape[0]:
        raise ValueError(
            f"LoRA layer {prefix}: expected down [rank, in] and up [out, rank], "
            f"got down {tuple(down.shape)} and up {tuple(up.shape)}"
        )
    alpha = float(layer.alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA layer {prefix}: alpha must be a positive finite number, got {layer.alpha!r}")
    _require_finite(down, f"LoRA layer {prefix} (down)")
    _require_finite(up, f"LoRA layer {prefix} (up)")


def load_lora(path: str | os.PathLike[str]) -> tuple[dict[str, LoraLayer], dict[str, Any]]:
    """Read a kohya-layout LoRA (lora_down/lora_up/alpha, or lora_A/lora_B) into layers keyed by prefix.

    A missing alpha means alpha = rank (scale 1), as in kohya and the host. Bundled embeddings
    (``bundle_emb.*``) are skipped; anything else unknown is a ValueError naming the file.
    """
    source = Path(path)
    tensors, raw_metadata = _read_safetensors(source)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        prefix, _, suffix = key.partition(".")
        if prefix == "bundle_emb":
            continue
        role = _LORA_ROLES.get(suffix)
        if role is None:
            raise ValueError(f"{source}: unknown LoRA layout (key {key!r}); {_layout_hint(prefix)}")
        if role in parts.setdefault(prefix, {}):
            raise ValueError(f"{source}: layer {prefix!r} has its {role} weight twice (kohya and peft spelling)")
        parts[prefix][role] = tensor

    layers: dict[str, LoraLayer] = {}
    for prefix, roles in parts.items():
        if "down" not in roles or "up" not in roles:
            raise ValueError(f"{source}: layer {prefix!r} lacks its lora_down or lora_up weight")
        down, up = roles["down"], roles["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"{source}: layer {prefix!r} is not a linear LoRA "
                f"(down {tuple(down.shape)}, up {tuple(up.shape)}); convolution LoRA is not supported"
            )
        alpha = float(roles["alpha"]) if "alpha" in roles else float(down.shape[0])
        layers[prefix] = LoraLayer(down=down, up=up, alpha=alpha)
    if not layers:
        raise ValueError(f"{source}: holds no LoRA layers")
    return layers, decode_metadata(raw_metadata)


def _layout_hint(prefix: str) -> str:
    if prefix in ("unet", "text_encoder", "base_model"):
        return "diffusers/peft files (keys starting 'unet.' or 'text_encoder.') are not supported; use kohya keys"
    return "expected '<prefix>.lora_down.weight', '<prefix>.lora_up.weight' and '<prefix>.alpha'"


# ---------------------------------------------------------------------------------------------------------------
# Training state: tensors + JSON in one safetensors file

TRAINING_STATE_KEY = "dreamartist_state"
TRAINING_STATE_FORMAT = "dreamartist-training-state/1"


def save_training_state(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]
) -> Path:
    """Save ``tensors`` and the JSON-serialisable ``state`` (under metadata key 'dreamartist_state')."""
    metadata = {TRAINING_STATE_KEY: json.dumps(state, sort_keys=True), "format": TRAINING_STATE_FORMAT}
    return save_safetensors_atomic(path, tensors, metadata)


def load_training_state(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    source = Path(path)
    tensors, metadata = _read_safetensors(source)
    if TRAINING_STATE_KEY not in metadata:
        raise ValueError(f"{source}: not a DreamArtist training state (no {TRAINING_STATE_KEY!r} metadata)")
    try:
        state = json.loads(metadata[TRAINING_STATE_KEY])
    except ValueError as error:
        raise ValueError(f"{source}: training state metadata is not valid JSON ({error})") from error
    return tensors, state


def flatten_optimizer_state(
    state_dict: dict, prefix: str = "optim"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a torch.optim state_dict into tensors named '<prefix>.<param_id>.<key>' and JSON-able metadata.

    Store the tensors beside the others in save_training_state and the metadata inside ``state``;
    unflatten_optimizer_state rebuilds a state_dict that makes the optimizer take bit-identical steps.
    Use a different ``prefix`` per optimizer when several share one file.
    """
    if "." in prefix:
        raise ValueError(f"optimizer prefix {prefix!r} must not contain '.'")
    tensors: dict[str, torch.Tensor] = {}
    tensor_names: dict[str, list] = {}
    plain_values: dict[str, dict[str, Any]] = {}
    for param_id, values in state_dict["state"].items():
        plain_values[str(param_id)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):  # exp_avg, exp_avg_sq, and the 0-dim 'step' of torch 2.x
                name = f"{prefix}.{param_id}.{key}"
                tensors[name] = value
                tensor_names[name] = [param_id, key]
            else:  # python scalars ('step' in older torch versions)
                plain_values[str(param_id)][key] = _json_checked(value, f"state[{param_id}][{key!r}]")

    groups = []
    tuple_keys: set[str] = set()
    for index, group in enumerate(state_dict["param_groups"]):
        plain_group = {}
        for key, value in group.items():
            if isinstance(value, tuple):  # 'betas'; JSON has no tuples, remember to restore them
                tuple_keys.add(key)
                value = list(value)
            plain_group[key] = _json_checked(value, f"param_groups[{index}][{key!r}]")
        groups.append(plain_group)

    meta = {
        "param_groups": groups,
        "tuple_keys": sorted(tuple_keys),
        "plain_state": plain_values,
        "tensors": tensor_names,
    }
    return tensors, meta


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    """Rebuild the state_dict that flatten_optimizer_state split; pass it to ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {int(param_id): dict(values) for param_id, values in meta["plain_state"].items()}
    for name, (param_id, key) in meta["tensors"].items():
        if name not in tensors:
            raise ValueError(f"optimizer state tensor {name!r} is missing")
        state.setdefault(int(param_id), {})[key] = tensors[name]
    groups = []
    for group in meta["param_groups"]:
        restored = dict(group)
        for key in meta["tuple_keys"]:
            if isinstance(restored.get(key), list):
                restored[key] = tuple(restored[key])
        groups.append(restored)
    return {"state": state, "param_groups": groups}


def _json_checked(value: Any, where: str) -> Any:
    if isinstance(value, torch.Tensor):
        raise TypeError(f"optimizer {where} is a tensor; only per-parameter state may hold tensors")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"optimizer {where} cannot be stored as JSON ({error})") from error
    return value


# RNG states are uint8 tensors, so they travel with the other tensors of a training state.

RNG_PREFIX = "rng"


def generator_state_tensor(generator: torch.Generator | None = None) -> torch.Tensor:
    """The state of ``generator`` (torch's default CPU generator when None) as a uint8 tensor."""
    state = generator.get_state() if generator is not None else torch.get_rng_state()
    return state.clone()


def restore_generator(state: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Inverse of generator_state_tensor."""
    state = state.to("cpu", torch.uint8)
    if generator is not None:
        generator.set_state(state)
    else:
        torch.set_rng_state(state)


def rng_state_tensors() -> dict[str, torch.Tensor]:
    """torch's global CPU RNG state and, when CUDA is available, every GPU's: 'rng.cpu', 'rng.cuda.<i>'."""
    states = {f"{RNG_PREFIX}.cpu": generator_state_tensor()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"{RNG_PREFIX}.cuda.{index}"] = state.clone()
    return states


def restore_rng_states(tensors: Mapping[str, torch.Tensor]) -> None:
    """Inverse of rng_state_tensors. GPU states for devices this machine lacks are ignored."""
    if f"{RNG_PREFIX}.cpu" in tensors:
        restore_generator(tensors[f"{RNG_PREFIX}.cpu"])
    if not torch.cuda.is_available():
        return
    for index in range(torch.cuda.device_count()):
        name = f"{RNG_PREFIX}.cuda.{index}"
        if name in tensors:
            torch.cuda.set_rng_state(tensors[name].to("cpu", torch.uint8), device=index)
