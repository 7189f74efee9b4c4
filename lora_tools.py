"""LoRA file tools, usable without a model: convert between our layout and diffusers/PEFT's (or any adapter type
into a plain LoRA by SVD), merge, resize by SVD, inspect. Every adapter type (lora, dora, loha, lokr) is handled;
a DoRA file's delta depends on the base weights, so turning one into a plain LoRA needs --base_model.

    python lora_tools.py inspect FILE
    python lora_tools.py convert FILE OUT --to peft|kohya
    python lora_tools.py convert FILE OUT --to lora --rank K [--base_model MODEL]
    python lora_tools.py merge OUT FILE:MULTIPLIER [FILE:MULTIPLIER ...]
    python lora_tools.py resize FILE OUT --rank K
"""

import argparse
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import torch

from sdlora.lora_file import (
    LAYOUTS, LORA_FORMAT_VERSION, MODEL_NAMES, LoRAError, LoRAModule, LoRAModules, bundled_embeddings,
    checked_modules, kohya_name, module_order, parse_path_number, rank_alpha_metadata, read_lora_file,
    read_lora_modules, write_lora_file,
)

# SD 1.x modules whose weight is a convolution (our adapters' targets): a LoHa/LoKr file stores their "in" side
# flattened, so a plain LoRA made of one needs the kernel back. 3x3: LoCon's targets; 1x1: the rest.
_CONV_3X3 = re.compile(r"\.(conv1|conv2|downsamplers\.0\.conv|upsamplers\.0\.conv)$")
_CONV_1X1 = re.compile(r"\.(proj_in|proj_out|conv_shortcut)$")
# Singular values below this share of a module's largest are rounding, not signal, in an exact conversion.
_EXACT_SVD_CUTOFF = 1e-6


def _plain_lora(key: tuple[str, str], module, rank: int | None, weights: dict | None) -> tuple[LoRAModule, float]:
    """The best plain LoRA of `module`'s delta at `rank` (None: every singular value above rounding, so the
    conversion is exact to fp32), by truncated SVD stored as up = U sqrt(S), down = sqrt(S) Vh, alpha = rank
    (scale 1); and the share of the delta's squared Frobenius norm (energy) kept. `weights` maps a module key to
    its base weight, needed for DoRA."""
    if module.network_type == "lora" and rank is None:
        return module, 1.0
    weight = (weights or {}).get(key)
    if module.network_type == "dora" and weight is None:
        raise LoRAError(f"{kohya_name(*key)} is DoRA: its delta depends on the base weights; give the base model "
                        f"(convert ... --to lora --rank K --base_model MODEL)")
    delta = module.delta(weight).double()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = int((s > _EXACT_SVD_CUTOFF * s[0]).sum()) if rank is None else min(rank, s.numel())
    keep = max(keep, 1)
    total = s.square().sum().item()
    root = s[:keep].sqrt()
    up, down = (u[:, :keep] * root).float(), (root[:, None] * vh[:keep]).float()
    path = key[1]
    if _CONV_3X3.search(path) or _CONV_1X1.search(path):
        kernel = 3 if _CONV_3X3.search(path) else 1
        up, down = up[:, :, None, None], down.reshape(keep, -1, kernel, kernel)
    energy = s[:keep].square().sum().item() / total if total > 0 else 1.0
    return LoRAModule(down=down.contiguous(), up=up.contiguous(), alpha=float(keep)), energy


def to_plain_lora(modules: LoRAModules, rank: int | None, weights: dict | None = None
                  ) -> tuple[LoRAModules, dict[tuple[str, str], float], float]:
    """Every module as a plain LoRA (see _plain_lora); returns the modules, the energy kept per module and
    overall (the fraction of the summed squared Frobenius norms)."""
    converted, energy, kept, total = {}, {}, 0.0, 0.0
    for key, module in modules.items():
        converted[key], energy[key] = _plain_lora(key, module, rank, weights)
        norm = module.delta((weights or {}).get(key)).square().sum().item() if rank is not None else 0.0
        kept, total = kept + energy[key] * norm, total + norm
    return converted, energy, (kept / total if total > 0 else 1.0)


def plain_lora_header(metadata: dict[str, str], modules: LoRAModules) -> dict[str, str]:
    """`metadata` for a file whose modules are now `modules` (plain LoRA after a conversion): the adapter type's
    keys dropped (a LyCORIS `ss_network_args` would tell kohya's tools to rebuild a LoHa), rank and alpha anew."""
    if metadata.get("network_type", "lora") == "lora" or any(m.network_type != "lora" for m in modules.values()):
        return metadata | rank_alpha_metadata(modules)
    header = {k: v for k, v in metadata.items() if k not in ("network_type", "ss_network_args")}
    return header | rank_alpha_metadata(modules) | {"ss_network_module": "networks.lora"}


def base_weights(base_model: str | Path, modules: LoRAModules) -> dict[tuple[str, str], torch.Tensor]:
    """The fp32 base weights of the modules a file names, from a diffusers folder (or hub id in the cache)."""
    from sdlora.loading import load_text_encoder, load_unet
    from sdlora.lora_file import _submodule

    models = {"unet": load_unet(str(base_model), torch.float32)}
    if any(name == "text_encoder" for name, _ in modules):
        models["text_encoder"] = load_text_encoder(str(base_model), torch.float32)
    weights = {}
    for key in modules:
        layer = _submodule(models[key[0]], *key)
        if layer is None:
            raise LoRAError(f"{kohya_name(*key)}: no such module in {base_model}; give the base model the file "
                            f"was trained on")
        weights[key] = layer.weight.detach().float()
    return weights


def embeddings_of(path: str | Path) -> dict[str, torch.Tensor]:
    """The token embeddings bundled in a LoRA file (pivotal tuning), carried over by every tool that rewrites it."""
    return bundled_embeddings(read_lora_file(path)[0])


def convert_lora_file(path: str | Path, out: str | Path, layout: str) -> Path:
    """Rewrite a LoRA file in `layout` ("kohya" or "peft"): the same tensors bit for bit, the same alphas and
    metadata, so kohya -> peft -> kohya gives the file back."""
    if layout not in LAYOUTS:
        raise LoRAError(f"--to {layout}: expected one of {', '.join(LAYOUTS)}")
    modules, metadata = read_lora_modules(path)
    return write_lora_file(out, modules, metadata, layout, embeddings=embeddings_of(path))


def convert_to_plain_lora(path: str | Path, out: str | Path, rank: int, base_model: str | Path | None = None
                          ) -> tuple[dict[tuple[str, str], float], float]:
    """Any adapter file (lora, dora, loha, lokr) as the nearest plain LoRA of `rank` (the truncated SVD of each
    module's delta, which diffusers and every client load), in the kohya layout; returns the energy kept per module
    and overall, which the header also records (`convert_energy_kept`). DoRA needs `base_model`."""
    if rank < 1:
        raise LoRAError(f"--rank {rank}: a LoRA rank must be at least 1, e.g. --rank 16")
    modules, metadata = read_lora_modules(path)
    needs_base = any(m.network_type == "dora" for m in modules.values())
    weights = base_weights(base_model, modules) if needs_base and base_model else None
    converted, energy, overall = to_plain_lora(modules, rank, weights)
    header = plain_lora_header(metadata, converted) | {"convert_energy_kept": f"{overall:.6f}",
                                                "converted_from": ",".join(sorted({m.network_type for m in
                                                                                    modules.values()}))}
    write_lora_file(out, converted, header, embeddings=embeddings_of(path))
    return energy, overall


def merge_lora_modules(sources: list[tuple[LoRAModules, float]]) -> LoRAModules:
    """Exact sum of LoRAs, each at its multiplier m_i, by concatenating ranks (a LoHa or LoKr module first becomes
    the exact plain LoRA of its delta, every singular value above rounding kept). For a module present in files i
    (others add nothing):

        down = cat_i(down_i)                      [sum r_i, in]
        up   = cat_i(m_i * (alpha_i / r_i) * up_i) [out, sum r_i]     alpha = sum r_i (scale 1)

    so up @ down = sum_i m_i * (alpha_i / r_i) * up_i @ down_i."""
    pieces: dict[tuple[str, str], list[tuple[LoRAModule, float]]] = {}
    for modules, multiplier in sources:
        modules, _, _ = to_plain_lora(modules, None)  # LoHa/LoKr exactly as LoRA (full SVD); DoRA refused
        for key, module in modules.items():
            pieces.setdefault(key, []).append((module, multiplier))
    merged = {}
    for key, found in sorted(pieces.items(), key=lambda item: module_order(item[0])):
        shapes = {(tuple(m.down.shape[1:]), tuple(m.up.shape[:1]) + tuple(m.up.shape[2:])) for m, _ in found}
        if len(shapes) > 1:
            raise LoRAError(f"{kohya_name(*key)} has different shapes in the files to merge ({sorted(shapes)}); "
                            f"only LoRAs for the same base model can be merged")
        down = torch.cat([m.down.float() for m, _ in found])
        up = torch.cat([multiplier * m.scale * m.up.float() for m, multiplier in found], dim=1)
        merged[key] = LoRAModule(down=down, up=up, alpha=float(down.shape[0]))
    return merged


def merge_lora_files(out: str | Path, inputs: list[tuple[str | Path, float]]) -> Path:
    """Merge LoRA files, each at its multiplier, into one kohya-layout file (see merge_lora_modules). Metadata all
    inputs agree on is kept; rank and alpha are the merged ones; `merged_from` lists [input, multiplier] pairs."""
    if not inputs:
        raise LoRAError("merge needs at least one FILE:MULTIPLIER")
    read = [read_lora_modules(path) for path, _ in inputs]
    merged = merge_lora_modules([(modules, multiplier) for (modules, _), (_, multiplier) in zip(read, inputs)])
    first, *others = [metadata for _, metadata in read]
    header = {k: v for k, v in first.items() if all(m.get(k) == v for m in others)}
    header = plain_lora_header(header, merged) | {"format_version": LORA_FORMAT_VERSION,
                                                  "merged_from": json.dumps([[str(p), m] for p, m in inputs])}
    embeddings = {}
    for path, _ in inputs:  # each token's vectors as trained (an embedding has no multiplier)
        for token, vectors in embeddings_of(path).items():
            if token in embeddings and not torch.equal(embeddings[token], vectors):
                raise LoRAError(f"{path} and another input bundle different embeddings for {token!r}; one LoRA file "
                                f"holds one embedding per token: merge files with other tokens")
            embeddings[token] = vectors
    return write_lora_file(out, merged, header, embeddings=embeddings)


def _delta_svd(module: LoRAModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD (U [out, k], S [k], Vh [k, in], fp64) of the module's delta, through its rank-r factors: with
    up = Qu Ru and down^T = Qd Rd, delta = Qu (scale * Ru Rd^T) Qd^T, so the SVD of the r x r core gives the
    delta's exactly, in O((out + in) r^2) instead of O(out * in * min(out, in))."""
    q_up, r_up = torch.linalg.qr(module.up.flatten(1).double())
    q_down, r_down = torch.linalg.qr(module.down.flatten(1).double().T)  # DoRA: its low-rank part
    u, s, vh = torch.linalg.svd(module.scale * r_up @ r_down.T, full_matrices=False)
    return q_up @ u, s, vh @ q_down.T


def resize_lora_modules(modules: LoRAModules, rank: int) -> tuple[LoRAModules, dict[tuple[str, str], float], float]:
    """Reduce every module of rank above `rank` to the best rank-`rank` approximation of its delta (Eckart-Young:
    the truncated SVD U_k S_k Vh_k), stored as up = U_k sqrt(S_k), down = sqrt(S_k) Vh_k, alpha = k (scale 1).
    Modules already at or below `rank` are kept as they are (nothing to lose). A LoHa or LoKr module becomes the
    nearest plain LoRA of that rank; a DoRA module keeps its magnitude, its low-rank part resized.

    Returns the modules, the energy kept per module, sum_{i<k} s_i^2 / sum_i s_i^2 (1 for a zero delta), and
    overall (the same sums over all modules: the fraction of the squared Frobenius norm kept)."""
    if rank < 1:
        raise LoRAError(f"rank {rank}: a LoRA rank must be at least 1, e.g. --rank 8")
    resized, energy = {}, {}
    all_kept, all_total = 0.0, 0.0
    for key, module in modules.items():
        if module.network_type in ("loha", "lokr"):  # no rank to cut: the nearest plain LoRA of that rank
            resized[key], energy[key] = _plain_lora(key, module, rank, None)
            total = module.delta().square().sum().item()
            all_kept, all_total = all_kept + energy[key] * total, all_total + total
            continue
        u, s, vh = _delta_svd(module)
        kept, total = s[:rank].square().sum().item(), s.square().sum().item()
        all_kept, all_total = all_kept + kept, all_total + total
        energy[key] = kept / total if total > 0 else 1.0
        if module.rank <= rank:
            resized[key] = module
            continue
        k = min(rank, s.numel())  # a delta has at most min(out, in) singular values
        root = s[:k].sqrt()
        up = (u[:, :k] * root).float().reshape(module.up.shape[0], k, *module.up.shape[2:])
        down = (root[:, None] * vh[:k]).float().reshape(k, *module.down.shape[1:])
        # DoRA: the low-rank part resized, the magnitude kept (the energy is the low-rank part's)
        resized[key] = LoRAModule(down=down.contiguous(), up=up.contiguous(), alpha=float(k),
                                  dora_scale=module.dora_scale)
    return resized, energy, (all_kept / all_total if all_total > 0 else 1.0)


def resize_lora_file(path: str | Path, out: str | Path, rank: int) -> tuple[dict[tuple[str, str], float], float]:
    """Resize a LoRA file to `rank` (see resize_lora_modules) and write it in the kohya layout; returns the energy
    kept per module and overall, which the file's metadata also records (`resize_energy_kept`)."""
    modules, metadata = read_lora_modules(path)
    resized, energy, overall = resize_lora_modules(modules, rank)
    header = plain_lora_header(metadata, resized) | {"resize_energy_kept": f"{overall:.6f}"}
    write_lora_file(out, resized, header, embeddings=embeddings_of(path))
    return energy, overall


def _target_name(module_path: str) -> str:
    """The projection a path ends in, inside its block: `...transformer_blocks.0.attn1.to_q` -> `attn1.to_q`,
    `...attentions.0.proj_in` -> `proj_in`, `encoder.layers.3.self_attn.q_proj` -> `self_attn.q_proj`,
    `...resnets.1.conv2` -> `conv2`, `...downsamplers.0.conv` -> `downsamplers.conv`."""
    module_path = re.sub(r"^.*\.(downsamplers|upsamplers)\.\d+\.", r"\1.", module_path)
    return re.sub(r"^.*\.(?:transformer_blocks|attentions|resnets|layers)\.\d+\.", "", module_path)


def _block_name(model_name: str, module_path: str) -> str:
    """`unet down_blocks.0`, `unet mid_block`, `unet up_blocks.1`, `text_encoder layers.3` (else the first segment)."""
    found = re.match(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.", module_path) if model_name == "unet" \
        else re.search(r"(layers\.\d+)\.", module_path)
    return f"{model_name} {found.group(1) if found else module_path.split('.')[0]}"


def inspect_lora_file(path: str | Path) -> dict:
    """What a LoRA file holds: layout, module counts per model, targets (projection -> count), ranks and alphas
    (value -> count), metadata, and the Frobenius norm of the delta (alpha / rank) up @ down per block
    (sqrt of the sum of its modules' squared norms) and overall."""
    tensors, metadata = read_lora_file(path)
    modules = checked_modules(path, tensors, metadata)
    squared: dict[str, float] = {}
    for (model_name, module_path), module in modules.items():
        block = _block_name(model_name, module_path)
        # DoRA's delta needs the base weights: its low-rank part stands for it here
        low_rank = LoRAModule(module.down, module.up, module.alpha) if module.network_type == "dora" else module
        squared[block] = squared.get(block, 0.0) + low_rank.delta().square().sum().item()
    return {
        "file": str(path),
        "layout": "peft" if any(k.startswith(tuple(f"{m}." for m in MODEL_NAMES)) for k in tensors) else "kohya",
        "types": dict(Counter(module.network_type for module in modules.values())),
        "modules": dict(Counter(model_name for model_name, _ in modules)),
        "targets": dict(Counter(_target_name(module_path) for _, module_path in modules)),
        "ranks": dict(sorted(Counter(m.rank for m in modules.values()).items())),
        "alphas": dict(sorted(Counter(m.alpha for m in modules.values()).items())),
        "metadata": metadata,
        "block_norms": {block: math.sqrt(value) for block, value in squared.items()},  # modules come in order
        "total_norm": math.sqrt(sum(squared.values())),
    }


def format_inspection(info: dict) -> str:
    """inspect_lora_file's result as a short report (long metadata values cut to one line)."""
    def counted(counts: dict) -> str:
        return ", ".join(f"{value} x{count}" for value, count in counts.items())

    width = max(len(block) for block in info["block_norms"])
    lines = [f"{info['file']}: {info['layout']} layout, "
             + ", ".join(f"{count} {model_name} modules" for model_name, count in info["modules"].items()),
             f"types: {counted(info['types'])}",
             f"targets: {counted(info['targets'])}",
             f"rank: {counted(info['ranks'])}",
             f"alpha: {counted(info['alphas'])}",
             "delta norm ||(alpha / rank) up @ down||_F per block (DoRA: before the magnitude; LoHa/LoKr: their "
             "delta):"]
    lines += [f"  {block:<{width}}  {norm:.6g}" for block, norm in info["block_norms"].items()]
    lines += [f"  {'total':<{width}}  {info['total_norm']:.6g}", f"metadata ({len(info['metadata'])} keys):"]
    for key, value in sorted(info["metadata"].items()):
        value = " ".join(value.split())
        lines.append(f"  {key}: {value[:70] + ' ...' if len(value) > 70 else value}")
    return "\n".join(lines)



# ---------------------------------------------------------------------------------------------------------------
# Command line: python lora_tools.py inspect|convert|merge|resize ...
def _merge_input(spec: str) -> tuple[Path, float]:
    """`FILE:MULTIPLIER` (the last colon splits, so Windows drive letters survive)."""
    try:
        return parse_path_number(spec)
    except ValueError:
        raise LoRAError(f"merge input {spec!r}: expected FILE:MULTIPLIER with a number after the last colon, "
                        f"e.g. style.safetensors:0.7") from None


def _run_tool(args: argparse.Namespace) -> str:
    if args.tool == "inspect":
        return format_inspection(inspect_lora_file(args.file))
    if args.tool == "convert" and args.to == "lora":
        if args.rank is None:
            raise LoRAError("--to lora needs --rank K, the plain LoRA's rank (e.g. --rank 16)")
        energy, overall = convert_to_plain_lora(args.file, args.out, args.rank, args.base_model)
        return _energy_lines(f"wrote {args.out}, a plain LoRA of rank {args.rank}", energy, overall)
    if args.tool == "convert":
        convert_lora_file(args.file, args.out, args.to)
        return f"wrote {args.out} in the {args.to} layout"
    if args.tool == "merge":
        inputs = [_merge_input(spec) for spec in args.inputs]
        merge_lora_files(args.out, inputs)
        ranks = ", ".join(f"{r} x{n}" for r, n in inspect_lora_file(args.out)["ranks"].items())
        return f"wrote {args.out}: {len(inputs)} file(s) merged, rank {ranks}"
    energy, overall = resize_lora_file(args.file, args.out, args.rank)
    return _energy_lines(f"wrote {args.out} at rank {args.rank}", energy, overall)


def _energy_lines(done: str, energy: dict[tuple[str, str], float], overall: float) -> str:
    lowest = sorted(energy.items(), key=lambda item: item[1])[:5]
    return "\n".join([f"{done}: {100 * overall:.2f}% of the delta energy kept overall; lowest modules:"]
                     + [f"  {100 * kept:6.2f}%  {kohya_name(*key)}" for key, kept in lowest])


def cli(argv: list[str] | None = None) -> int:
    """`python lora_tools.py TOOL ...`; a user mistake prints one `error: ...` line and returns 1."""
    parser = argparse.ArgumentParser(prog="python lora_tools.py", description="LoRA file tools for SD 1.x.")
    tools = parser.add_subparsers(dest="tool", required=True)
    inspect = tools.add_parser("inspect", help="targets, ranks, alphas, metadata and per-block delta norms")
    inspect.add_argument("file", type=Path)
    convert = tools.add_parser("convert", help="rewrite in the kohya/A1111 or the diffusers/PEFT layout, alphas kept; "
                                               "or any adapter type as a plain LoRA of --rank by SVD")
    convert.add_argument("file", type=Path)
    convert.add_argument("out", type=Path)
    convert.add_argument("--to", choices=LAYOUTS + ("lora",), required=True,
                         help="kohya: ours, A1111, ComfyUI; peft: diffusers; lora: the nearest plain LoRA (any type)")
    convert.add_argument("--rank", type=int, help="with --to lora: the plain LoRA's rank")
    convert.add_argument("--base_model", help="with --to lora, for a DoRA file: the base model (diffusers folder)")
    merge = tools.add_parser("merge", help="one file holding the sum of LoRAs, each at its multiplier (exact: ranks "
                                           "add up)")
    merge.add_argument("out", type=Path)
    merge.add_argument("inputs", nargs="+", metavar="FILE:MULTIPLIER")
    resize = tools.add_parser("resize", help="lower the rank by truncated SVD, reporting the energy kept")
    resize.add_argument("file", type=Path)
    resize.add_argument("out", type=Path)
    resize.add_argument("--rank", type=int, required=True, help="the new rank, at least 1")
    args = parser.parse_args(argv)
    try:
        print(_run_tool(args))
    except LoRAError as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
