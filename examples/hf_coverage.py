"""Which Hugging Face architectures `insert_gates` gates, generated rather than claimed.

Every model type of the installed transformers whose modeling module defines a
`GradientCheckpointingLayer` is built from a tiny config and gated, each in a child process
with a time limit (one hang or crash costs one row, not the run). The table it writes into
docs/transformers.md, between ``<!-- begin coverage table -->`` and
``<!-- end coverage table -->``, says per architecture how many layers got an attention gate
and how many an MLP gate, and what the warning or refusal said about the rest.

The tiny config is generic: the class's default config with the parameters in `SHRINK`
replaced where they exist (sub-configs such as ``text_config`` too), and a few commented
`OVERRIDES`. A gate counts as attention when its name below its layer mentions attn,
attention, self or cross (``self_attn``, ``attention.output``, ``encoder_attn``) or its
module's class does (Nemotron-H's ``mixer`` that is a ``NemotronHAttention``), as MLP
otherwise (``mlp``, ``output``, ``fc1``, T5's ``layer.1``, a Mamba ``mixer``); a gate on a
whole layer, or outside every layer, is "other". An architecture whose plain tiny model
fails on the example inputs, or does not run every layer on them, is listed under "no small
config", not in the table.

    python examples/hf_coverage.py                    # every architecture, an hour or more
    python examples/hf_coverage.py --only llama,t5    # update these rows
    python examples/hf_coverage.py --check            # exit 1 with a diff if the docs differ
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import inspect
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent / "docs" / "transformers.md"
BEGIN, END = "<!-- begin coverage table -->", "<!-- end coverage table -->"
COMMAND = "python examples/hf_coverage.py"
HEADER = (
    "| model type | class | layers | attention gated | MLP gated | other gates "
    "| not gated, and why |\n|---|---|---|---|---|---|---|"
)
NO_SMALL = "No small config (the plain tiny model fails, or does not run every layer):"
TIMED_OUT = "Timed out or crashed:"
VOCAB, LENGTH, LAYERS = 100, 8, 2
ATTENTION_WORDS = ("attn", "attention", "self", "cross")
SPECIAL_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "decoder_start_token_id": 1}

KV_HEADS = ("num_key_value_heads", "n_head_kv", "num_kv_heads", "multi_query_group_num")


def _heads(v: Any) -> Any:
    """4 heads; per stage (Swin) 1, 2, 4, 4...: each divides its stage's width, 32 * 2**i."""
    return [2 ** min(i, 2) for i in range(len(v))] if isinstance(v, list | tuple) else 4


# Parameter -> tiny value, applied wherever the parameter exists (in sub-configs too) and is
# set; a callable gets the default. Integers only replace integers, so a None stays None.
SHRINK: dict[str, Any] = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "n_embed", "embed_dim",
                     "word_embed_proj_dim", "projection_dim", "text_hidden_size",
                     "out_hidden_size", "encoder_hidden_size", "vision_hidden_size"), 32),
    **dict.fromkeys(("embedding_size", "embedding_dim"), 32),
    **dict.fromkeys(("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers",
                     "decoder_layers", "num_decoder_layers", "depth"), LAYERS),
    "depths": lambda v: [min(d, 2) for d in v],
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "n_heads", "attention_heads",
                     "encoder_attention_heads", "decoder_attention_heads"), _heads),
    **dict.fromkeys(KV_HEADS, 2),  # as many as the heads where the default has as many
    **dict.fromkeys(("head_dim", "d_kv", "kv_channels", "attention_head_dim", "v_head_dim",
                     "qk_rope_head_dim", "qk_nope_head_dim"), 8),
    "qk_head_dim": 16,
    "rotary_dim": lambda v: min(v, 4),  # within the head
    "rope_parameters": lambda v: _rope(v),  # defined below
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank"), 16),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim",
                     "d_ff", "n_inner", "mlp_dim", "ffn_hidden_size", "decoder_intermediate_size",
                     "shared_intermediate_size"), 64),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size",
                     "expert_intermediate_size"), 32),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "moe_k"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts",
                     "topk_group", "n_group", "first_k_dense_replace"), 1),
    "vocab_size": VOCAB,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "max_seq_len",
                     "max_target_positions", "max_sequence_length"), lambda v: min(v, 128)),
    "max_source_positions": lambda v: min(v, 32),  # Whisper: input_features are twice as long
    "image_size": lambda v: [32] * len(v) if isinstance(v, list | tuple) else 32,
    "patch_size": lambda v: [4] * len(v) if isinstance(v, list | tuple) else min(v, 4),
    "num_frames": 2,
    **dict.fromkeys(("num_mel_bins", "feature_size", "input_feat_per_channel"), 16),
}  # fmt: skip

# The few architectures the generic rules do not fit, and why.
# Swin-like: four stages leave a 32-pixel image too few patches, and a window of 7 tiles none.
_SWIN = {"depths": [2, 2], "num_heads": [2, 4], "window_size": 4}
OVERRIDES: dict[str, dict[str, Any]] = {
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},  # one entry per layer
    **dict.fromkeys(("swin", "swinv2", "donut-swin", "maskformer-swin"), _SWIN),
    # M-RoPE: the modeling code's default sections are for 128-wide heads; ours are 8 wide
    **dict.fromkeys(("qwen2_vl_text", "qwen2_5_vl_text"),
                    {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1]}}),
}  # fmt: skip


@dataclass
class Result:
    """One architecture's outcome: a row (`status` "row"), or why it has none."""

    model_type: str
    status: str  # row, no small config, skip, timeout
    cls: str = ""
    layers: int = 0
    attention: int = 0
    mlp: int = 0
    other: int = 0
    why: str = ""
    gates: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    stderr: str = ""
    seconds: float = 0.0
    line: str = ""  # a row kept from the docs as it was

    def row(self) -> str:
        if self.line:
            return self.line
        cells = (f"`{self.model_type}`", f"`{self.cls}`", self.layers, self.attention, self.mlp,
                 self.other, self.why.replace("|", "\\|"))  # fmt: skip
        return "| " + " | ".join(str(c) for c in cells) + " |"


class NoSmallConfig(Exception):
    """The architecture's tiny model cannot be built or run without gates."""


# ---- the tiny model ---------------------------------------------------------------------


def candidates() -> list[str]:
    """Model types whose modeling module's source mentions GradientCheckpointingLayer (the
    child checks that it really defines a subclass)."""
    import transformers
    from transformers.models.auto.configuration_auto import (
        CONFIG_MAPPING_NAMES,
        model_type_to_module_name,
    )

    root = Path(transformers.models.__file__).parent
    found = []
    for model_type in CONFIG_MAPPING_NAMES:
        module = model_type_to_module_name(model_type)
        path = root / module / f"modeling_{module}.py"
        if path.exists() and "GradientCheckpointingLayer" in path.read_text():
            found.append(model_type)
    return sorted(found)


def shrink(config: Any) -> dict[str, Any]:
    """The keyword arguments that make a config of `config`'s class tiny: `SHRINK`'s values
    for its set parameters, sub-configs as dicts of their own, per-layer lists truncated.
    Attributes that are no parameter (Swin's hidden_size) are derived by the config."""
    from transformers import PreTrainedConfig

    params = inspect.signature(type(config).__init__).parameters
    values = {k: v for k, v in vars(config).items() if k in params}
    out: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, PreTrainedConfig):
            out[name] = {"model_type": value.model_type, **shrink(value)}
        elif name in SHRINK and value is not None and not isinstance(value, bool):
            rule = SHRINK[name]
            new = rule(value) if callable(rule) else rule
            if isinstance(value, int) and isinstance(new, int):
                out[name] = new
            elif isinstance(value, list | tuple) and isinstance(new, list | tuple):
                out[name] = type(value)(new)
            elif isinstance(value, dict) and isinstance(new, dict):
                out[name] = new
        elif name.endswith("_token_id") and isinstance(values.get("vocab_size"), int):
            out[name] = _token(name, value)
    heads = [k for k in values if SHRINK.get(k) is _heads and isinstance(values[k], int)]
    for kv in KV_HEADS:
        if kv in out and heads and values[kv] >= values[heads[0]]:  # no grouped queries
            out[kv] = out[heads[0]]
    layers = {values[k] for k in layers_attributes(values)}
    for name, value in values.items():
        if name in out or not isinstance(value, list | tuple) or len(value) not in layers:
            continue
        if name == "layer_types":  # one layer of each kind, in the order they come
            kinds = list(dict.fromkeys(value))
            kinds += [value[-1]] * (LAYERS - len(kinds))
            out[name] = type(value)(kinds)
            for k in layers_attributes(values):
                out[k] = len(kinds)
        elif all(isinstance(v, int | float | str | None) for v in value):
            out[name] = type(value)(value[:LAYERS])
    return out


def _rope(value: Any) -> Any:
    """RoPE parameters (per layer type too) for 8-wide heads and 128 positions."""
    if not isinstance(value, dict):
        return value
    out = {k: _rope(v) for k, v in value.items()}
    if isinstance(sections := out.get("mrope_section"), list | tuple):  # sums to head_dim / 2
        out["mrope_section"] = [4 - (len(sections) - 1)] + [1] * (len(sections) - 1)
    if isinstance(out.get("original_max_position_embeddings"), int):
        out["original_max_position_embeddings"] = min(out["original_max_position_embeddings"], 64)
    return out


def layers_attributes(values: dict[str, Any]) -> list[str]:
    """The parameters that count layers (``num_hidden_layers``, ``encoder_layers``...)."""
    return [k for k in SHRINK if SHRINK[k] == LAYERS and isinstance(values.get(k), int)]


def _token(name: str, value: Any) -> Any:
    """Special token ids inside the tiny vocabulary, below the ids the inputs draw (3..99)."""
    if isinstance(value, list):
        return [_token(name, v) for v in value] if value else value
    if not isinstance(value, int) or isinstance(value, bool) or value < VOCAB:
        return value
    return SPECIAL_TOKENS.get(name, 2)


def tiny_config(model_type: str) -> Any:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    kwargs = {**shrink(config_class()), **OVERRIDES.get(model_type, {})}
    try:
        return config_class(**kwargs)
    except Exception as e:
        raise NoSmallConfig(f"config: {_first_line(e)}") from e


def task_class(model_type: str, config: Any) -> type:
    """ForCausalLM for decoders; ForConditionalGeneration for encoder-decoders; then
    sequence or image classification; then the base model (for a sub-model such as
    ``clip_text_model`` not in the mappings, the config's namesake: CLIPTextModel)."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    seq2seq = (auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
               auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES)  # fmt: skip
    rest = (auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
            auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, *seq2seq, auto.MODEL_MAPPING_NAMES)
    if getattr(config, "is_encoder_decoder", False):
        order = (*seq2seq, auto.MODEL_MAPPING_NAMES)
    elif model_type not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:  # not an encoder
        order = (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, *rest)
    else:
        order = rest
    for mapping in order:
        name = mapping.get(model_type)
        if isinstance(name, tuple | list):
            name = name[0]
        if name and hasattr(transformers, name):
            return getattr(transformers, name)
    namesake = type(config).__name__.removesuffix("Config") + "Model"  # a sub-model's class
    if hasattr(transformers, namesake):
        return getattr(transformers, namesake)
    raise NoSmallConfig("no model class in the auto mappings")


def inner_layers(model: Any) -> list[tuple[str, Any]]:
    """The innermost `GradientCheckpointingLayer`s, as `insert_gates` finds them (without
    its refusals: a model whose layers share weights still gets its row)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]
    return [(n, m) for n, m in found if not any(o.startswith(n + ".") for o, _ in found)]


def defines_layer(cls: type) -> bool:
    from transformers.modeling_layers import GradientCheckpointingLayer

    module = sys.modules[cls.__module__]
    return any(inspect.isclass(v) and issubclass(v, GradientCheckpointingLayer)
               and v is not GradientCheckpointingLayer for v in vars(module).values())  # fmt: skip


def _find(config: Any, name: str) -> Any:
    """`name` in the config or its first sub-config that has it."""
    if getattr(config, name, None) is not None:
        return getattr(config, name)
    for sub in ("vision_config", "audio_config", "encoder", "encoder_config"):
        value = getattr(getattr(config, sub, None), name, None)
        if value is not None:
            return value
    return None


def input_candidates(model: Any) -> list[dict[str, Any]]:
    """Example inputs to try, in order: the model's main input (token ids with a mask, an
    image, a waveform or features), with the decoder's ids for an encoder-decoder and, for
    a text model that also takes images, with an image."""
    import torch

    g = torch.Generator().manual_seed(1)
    config, main = model.config, model.main_input_name
    text = {"input_ids": torch.randint(3, VOCAB, (1, LENGTH), generator=g),
            "attention_mask": torch.ones(1, LENGTH, dtype=torch.long)}  # fmt: skip
    image = None
    size, channels = _find(config, "image_size"), _find(config, "num_channels") or 3
    if isinstance(size, int | list | tuple):
        h, w = (size, size) if isinstance(size, int) else size[-2:]
        image = torch.randn(1, channels, h, w, generator=g)
        frames = _find(config, "num_frames")
        if isinstance(frames, int):
            image = torch.randn(1, frames, channels, h, w, generator=g)
    if main == "input_ids":
        tries = [text]
        params = inspect.signature(model.forward).parameters
        if image is not None and "pixel_values" in params:
            tries.append({**text, "pixel_values": image})
    elif main == "pixel_values" and image is not None:
        tries = [{"pixel_values": image}]
    elif main == "input_values":
        tries = [{"input_values": torch.randn(1, 1600, generator=g)}]
    elif main == "input_features":
        bins = next((v for k in ("num_mel_bins", "input_feat_per_channel", "feature_size")
                     if isinstance(v := _find(config, k), int)), 16)  # fmt: skip
        positions = _find(config, "max_source_positions")
        frames = 2 * positions if isinstance(positions, int) else 64
        tries = [{"input_features": torch.randn(1, bins, frames, generator=g)},
                 {"input_features": torch.randn(1, frames, bins, generator=g)}]  # fmt: skip
    else:
        raise NoSmallConfig(f"main input {main}")
    if getattr(config, "is_encoder_decoder", False):
        ids = torch.randint(3, VOCAB, (1, 4), generator=g)
        tries = [{**t, "decoder_input_ids": ids} for t in tries]
    return tries


def build(model_type: str) -> tuple[Any, dict[str, Any]]:
    """The tiny model in eval mode (seed 0) and the first example inputs on which its plain
    forward runs every layer."""
    import torch

    config = tiny_config(model_type)
    cls = task_class(model_type, config)
    if not defines_layer(cls):
        raise LookupError("no GradientCheckpointingLayer")
    torch.manual_seed(0)
    try:
        model = cls(config).eval()
    except Exception as e:
        raise NoSmallConfig(f"build: {_first_line(e)}") from e
    layers = inner_layers(model)
    if not layers:  # the module's layers are another class's (Gemma 3n's audio encoder)
        raise LookupError("no GradientCheckpointingLayer")
    problems = []
    for x in input_candidates(model):
        called: set[str] = set()
        handles = [m.register_forward_pre_hook(lambda _m, _a, n=n, seen=called: seen.add(n))
                   for n, m in layers]  # fmt: skip
        try:
            with torch.no_grad():
                model(**x)
        except Exception as e:
            problems.append(f"forward ({', '.join(x)}): {_first_line(e)}")
            continue
        finally:
            for h in handles:
                h.remove()
        if len(called) == len(layers):
            return model, x
        problems.append(f"forward ({', '.join(x)}) runs {len(called)} of {len(layers)} layers")
    raise NoSmallConfig("; ".join(problems))


# ---- gating and the row -----------------------------------------------------------------


def survey(model_type: str) -> Result:
    """Build `model_type`'s tiny model and gate it, in this process."""
    import consensus_gates as cg

    start = time.perf_counter()
    try:
        model, x = build(model_type)
    except LookupError:
        return Result(model_type, "skip")
    except NoSmallConfig as e:
        return Result(model_type, "no small config", why=str(e))
    except Exception as e:  # the generic rules built something the class refuses
        return Result(model_type, "no small config", why=_first_line(e))
    layers = [p for p, _ in inner_layers(model)]
    result = Result(model_type, "row", cls=type(model).__name__, layers=len(layers))
    with warnings.catch_warnings(record=True) as caught, capture_stderr() as err:
        warnings.simplefilter("always")
        try:
            gated = cg.insert_gates(model, x)
        except Exception as e:
            gated = None
            result.why = f"refused: {type(e).__name__}: {_first_line(e)}"
    result.stderr = err.getvalue()
    if gated is not None:
        result.gates = sorted(gated.gates)
        result.rejected = list(gated.spec.get("rejected", []))
        for w in caught:
            if str(w.message).startswith("insert_gates left residual additions"):
                result.why = _short_reasons(str(w.message), layers)
    count_gates(result, layers, model)
    result.seconds = round(time.perf_counter() - start, 1)
    return result


def count_gates(result: Result, layers: list[str], model: Any = None) -> None:
    """Layers with an attention gate, layers with an MLP gate, and other gates. A gate is
    attention where its name below the layer or its module's class (in `model`) says so:
    Nemotron-H names every branch ``mixer``."""
    attention, mlp = set(), set()
    for gate in result.gates:
        layer = max((p for p in layers if gate.startswith(p + ".")), key=len, default=None)
        if layer is None:
            result.other += 1
            continue
        below = gate[len(layer) + 1 :].lower()
        with contextlib.suppress(AttributeError):
            below += " " + type(model.get_submodule(gate.partition("#")[0])).__name__.lower()
        (attention if any(w in below for w in ATTENTION_WORDS) else mlp).add(layer)
    result.attention, result.mlp = len(attention), len(mlp)


def _short_reasons(message: str, layers: list[str]) -> str:
    """The warning's lines as 'reason: the places below their layers (how many)'."""
    parts = []
    for line in message.splitlines()[1:]:
        reason, _, places = line.strip().partition(": ")
        where = []
        for place in re.findall(r"([\w.]+) \(\w+\)", places):
            if place in layers:
                where.append("the layer")
                continue
            layer = max((p for p in layers if place.startswith(p + ".")), key=len, default="")
            where.append(f"`{place[len(layer) + 1 :] if layer else place}`")
        n = len(where)
        parts.append(f"{reason}: {', '.join(dict.fromkeys(where))} ({n})")
    return "; ".join(parts)


@contextlib.contextmanager
def capture_stderr():
    """What is written to file descriptor 2 (fx tracebacks, C++ warnings) while inside."""
    import io

    buffer = io.StringIO()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as tmp:
        os.dup2(tmp.fileno(), 2)
        old, sys.stderr = sys.stderr, tmp
        try:
            yield buffer
        finally:
            tmp.flush()
            sys.stderr = old
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buffer.write(tmp.read())


def _first_line(e: BaseException) -> str:
    """The message's first line, or for a config validator's ("Class validation error for
    validator ...:") the second, which says what is wrong."""
    text = [t.strip() for t in str(e).strip().splitlines() if t.strip()]
    line = text[0] if text else type(e).__name__
    if line.startswith("Class validation error") and len(text) > 1:
        line = text[1]
    return line if len(line) <= 160 else line[:157] + "..."


# ---- a child process per architecture ----------------------------------------------------


def _child(model_type: str, conn: Any) -> None:
    import torch

    torch.set_num_threads(1)
    try:
        result = survey(model_type)
    except BaseException as e:  # noqa: BLE001 - anything, so the parent learns of it
        result = Result(model_type, "timeout", why=f"crashed: {_first_line(e)}",
                        stderr=traceback.format_exc())  # fmt: skip
    conn.send(asdict(result))
    conn.close()


def survey_in_child(model_type: str, timeout: float) -> Result:
    """`survey` in a forked child, killed after `timeout` seconds."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(model_type, send), daemon=True)
    child.start()
    send.close()
    try:
        if receive.poll(timeout):
            return Result(**receive.recv())
        return Result(model_type, "timeout", why=f"timed out after {timeout:.0f} s")
    except EOFError:
        return Result(model_type, "timeout", why=f"crashed (exit code {child.exitcode})")
    finally:
        if child.is_alive():
            child.kill()
        child.join()


# ---- the docs ----------------------------------------------------------------------------


def render(results: list[Result]) -> str:
    import transformers

    rows = sorted((r for r in results if r.status == "row"), key=lambda r: r.model_type)
    none = sorted(r.model_type for r in results if r.status == "no small config")
    lost = sorted(r.model_type for r in results if r.status == "timeout")
    lines = [HEADER, *(r.row() for r in rows), ""]
    lines.append(f"Generated with transformers {transformers.__version__} by `{COMMAND}` "
                 f"({len(rows)} architectures).")  # fmt: skip
    lines += ["", f"{NO_SMALL} {', '.join(none) or 'none'}."]
    if lost:
        lines += ["", f"{TIMED_OUT} {', '.join(lost)}."]
    return "\n".join(lines)


def parse(block: str) -> tuple[dict[str, str], set[str], set[str]]:
    """The table's rows by model type, and the no-small-config and timed-out lists."""
    rows = {m.group(1): line for line in block.splitlines()
            if (m := re.match(r"\| `([^`]+)` \|", line))}  # fmt: skip

    def listed(prefix: str) -> set[str]:
        for line in block.splitlines():
            if line.startswith(prefix):
                names = line[len(prefix) :].strip().rstrip(".")
                return {n.strip() for n in names.split(",")} - {"none", ""}
        return set()

    return rows, listed(NO_SMALL), listed(TIMED_OUT)


def docs_block(text: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{DOCS} has no {BEGIN} ... {END} markers")
    return text[start + len(BEGIN) : end].strip("\n")


def merge(old_block: str, results: list[Result]) -> list[Result]:
    """The docs' entries for the model types not surveyed now, beside the new results."""
    rows, none, lost = parse(old_block)
    done = {r.model_type for r in results}
    kept = [Result(m, "row", line=line) for m, line in rows.items() if m not in done]
    kept += [Result(m, "no small config") for m in none - done]
    kept += [Result(m, "timeout") for m in lost - done]
    return kept + results


def write_atomically(path: Path, text: str) -> None:
    """A reader never sees half a page: a temporary file beside it, then a rename."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.chmod(f.name, path.stat().st_mode)  # the temporary file's own mode is 0600
    os.replace(f.name, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model types (default: all)")
    parser.add_argument("--check", action="store_true",
                        help="compare with the docs, write nothing, exit 1 on a difference")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per architecture")
    parser.add_argument("--verbose", action="store_true", help="print each result as it comes")
    parser.add_argument("--json", type=Path, help="also write every result, gates included")
    args = parser.parse_args(argv)
    old = docs_block(DOCS.read_text())  # the markers are there before an hour's run
    importlib.import_module("consensus_gates")  # imported once, before the children fork
    importlib.import_module("transformers")
    types = [t.strip() for t in args.only.split(",")] if args.only else candidates()
    results = []
    for i, model_type in enumerate(types, 1):
        result = survey_in_child(model_type, args.timeout)
        results.append(result)
        if args.verbose:
            print(f"[{i}/{len(types)}] {model_type}: {result.status} {result.why[:100]}",
                  file=sys.stderr, flush=True)  # fmt: skip
        if args.json:  # as it goes, for a run cut short
            args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    if args.only and not args.check:  # the other entries stay; one now skipped leaves them
        results = merge(old, results)
    results = [r for r in results if r.status != "skip"]
    if args.check:
        rows, none, _ = parse(old)
        new_rows, new_none, _ = parse(render(results))
        want = [rows.get(r.model_type, f"(no row for {r.model_type})")
                for r in results if r.model_type not in none]  # fmt: skip
        got = [new_rows.get(r.model_type, f"(no row for {r.model_type})")
               for r in results if r.model_type not in new_none]  # fmt: skip
        diff = list(difflib.unified_diff(want, got, "docs", "now", lineterm=""))
        surveyed = {r.model_type for r in results}
        if none & surveyed != new_none:
            diff.append(f"no small config: docs {sorted(none & surveyed)}, now {sorted(new_none)}")
        print("\n".join(diff) or "the docs' rows are up to date")
        return 1 if diff else 0
    block = render(results)
    print(block)
    text = DOCS.read_text()
    start, end = text.find(BEGIN) + len(BEGIN), text.find(END)
    write_atomically(DOCS, text[:start] + "\n" + block + "\n" + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
