"""Options shared by the commands, and argparse ``type=`` checks that reject bad values at parse time.

Every check runs before any model is loaded or anything is written: argparse turns the
``ArgumentTypeError`` into one line, ``ffsplit-export <command>: error: argument --x: ...``,
and exit code 2. ``optimum-cli export ffsplit`` adds the same options through
:func:`add_export_arguments`.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path

# The lowest ONNX opset the export supports: below it torch.onnx cannot express the graphs of the
# supported models (``arange`` needs 11, the attention masks 14), so a lower --opset would only fail
# after calibration and splitting.
MIN_OPSET = 14
ISA_NAMES = ("auto", "scalar", "avx2", "avx512", "avx512vbmi2", "avx512vnni")
PROVIDERS = ("cpu", "cuda", "tensorrt")


# argparse takes "-1e-4", "-inf" or "-nan" for an option (its own pattern knows only "-1" and "-.5") and
# then says "expected one argument": every negative number is a value, so its type check names it
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?|inf(inity)?|nan)$", re.I)
# words with which a message already says what to do; argparse's own messages get a pointer to --help
_FIX_WORDS = ("use ", "pass ", "choose", "--help", "leave it out", "re-run", "install", "build")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: error: ...``), exit code 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message: str):
        message = " ".join(message.split())  # one line, whatever argparse or a type check wrote
        if not any(w in message for w in _FIX_WORDS):
            message += f"; see `{self.prog} --help`"
        self.exit(2, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------------------ type checks


def _number(text: str, kind: Callable, what: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; use {what}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, lengths, sizes)."""
    value = _number(text, int, "an integer; use a whole number >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive; use a whole number >= 1")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(text, int, "an integer; use a whole number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; use a whole number >= 0")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, "a number; use a number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not positive; use a number > 0")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(text, float, "a number; use a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} is negative; use a number >= 0")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1] (heavy fraction, size budget, sparsity)."""
    value = _number(text, float, "a number; use a number between 0 and 1")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value:g} is out of range; use a number between 0 and 1")
    return value


def fraction_list(text: str) -> list[float]:
    """A comma list of numbers in [0, 1], e.g. ``0.5,0.75,0.9``."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            values.append(fraction(part))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e} (in {text!r}, e.g. 0.5,0.75,0.9)") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} holds no number; use e.g. 0.5,0.75,0.9")
    return values


def positive_int_list(text: str) -> list[int]:
    """A comma list of integers >= 1, e.g. ``32,256``."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            values.append(positive_int(part))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e} (in {text!r}, e.g. 32,256)") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} holds no number; use e.g. 32,256")
    return values


def one_of(names: tuple[str, ...]) -> Callable[[str], str]:
    """The value itself, if it is one of ``names``."""

    def check(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"{text!r} is not known; use one of: {', '.join(names)}")
        return text

    check.__name__ = "name"
    return check


def format_name(enum) -> Callable[[str], str]:
    """The value itself (a string, as before), if it is a member of the format enum ``enum``."""

    def check(text: str) -> str:
        names = tuple(m.value for m in enum)
        if text not in names:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a known format; use one of: {', '.join(names)}"
            )
        return text

    check.__name__ = enum.__name__
    return check


def isa_list(text: str) -> list[str]:
    """A comma list of FFSPLIT_ISA values, e.g. ``auto,avx512vnni``."""
    values = [p.strip() for p in text.split(",") if p.strip()]
    bad = [v for v in values if v not in ISA_NAMES]
    if bad or not values:
        raise argparse.ArgumentTypeError(
            f"{(bad or [text])[0]!r} is not an ISA path; use a comma list of {', '.join(ISA_NAMES)}"
        )
    return values


def opset(text: str) -> int:
    value = _number(text, int, f"an integer; use an opset >= {MIN_OPSET}, or leave it out")
    if value < MIN_OPSET:
        raise argparse.ArgumentTypeError(
            f"opset {value} is too old for these exports; use {MIN_OPSET} or newer, or leave it out "
            "(optimum's default for the model)"
        )
    return value


def accuracy_level(text: str) -> int:
    value = _number(text, int, "an integer; use 0 (exact fp32) to 4 (int8 compute)")
    if value not in (0, 1, 2, 3, 4):
        raise argparse.ArgumentTypeError(f"{value} is out of range; use 0 (exact fp32) to 4 (int8 compute)")
    return value


def group_size(text: str) -> int:
    from ..split import INT4_GROUP_SIZES

    value = _number(text, int, f"an integer; use one of {INT4_GROUP_SIZES}")
    if value not in INT4_GROUP_SIZES:
        raise argparse.ArgumentTypeError(f"{value} is not supported; use one of {INT4_GROUP_SIZES}")
    return value


def heavy_selection(text: str) -> str:
    from ..plan import SELECTIONS

    return one_of(tuple(SELECTIONS))(text)


def data_source(text: str) -> str:
    """An existing file / folder, or one of the offline text sources (bible, fortunes, gensim)."""
    from ..data.evaldata import TEXT_SOURCES

    if text in TEXT_SOURCES or text == "builtin" or Path(text).exists():
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} does not exist; pass a text file (one sample per line), a WAV folder, a datasets "
        f"directory, or one of {', '.join(TEXT_SOURCES)}, builtin"
    )


def text_source(text: str) -> str:
    from ..data.evaldata import TEXT_SOURCES

    return one_of(tuple(TEXT_SOURCES))(text)


def new_file_or_dir(text: str) -> str:
    """An output folder: anything but an existing file."""
    if Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is an existing file; pass a folder path")
    return text


def output_file(text: str) -> str:
    """A file to write (a JSON result): anything but an existing folder."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; pass a file path")
    return text


def _parsed_by_fused(parser: str, option: str, doc: str):
    """An argparse type that checks its text with ``ffsplit_export.fused.<parser>`` (the one parser of
    ``option``) and returns the text itself; a bad value becomes one argparse error line."""

    def check(text: str) -> str:
        from .. import fused
        from ..errors import ConfigError

        try:
            getattr(fused, parser)(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(
                f"{text!r}: " + str(e).removeprefix(f"{option}={text!r}: ")
            ) from None
        return text

    check.__name__, check.__doc__ = option.lstrip("-").replace("-", "_"), doc
    return check


input_sparsity = _parsed_by_fused(
    "parse_input_sparsity", "--input-sparsity", "``--input-sparsity``: 0 or a fraction 0 < F < 1."
)
activation_sparsity = _parsed_by_fused(
    "parse_activation_sparsity", "--activation-sparsity", "``--activation-sparsity``: 0, exact or 0 < F < 1."
)


def skip_criterion(text: str) -> str:
    """``--skip-criterion``: mixed, gate or product (checked by the one parser in fused)."""
    from ..errors import ConfigError
    from ..fused import check_skip_criterion

    try:
        return check_skip_criterion(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--skip-criterion=")) from None


def existing_dir(text: str) -> str:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist; pass an existing folder")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; pass a folder")
    return text


def device(text: str) -> str:
    head, _, index = text.partition(":")
    if head == "cpu" and not index or head == "cuda" and (not index or index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N")


def export_dir(text: str) -> str:
    """A folder written by ``ffsplit-export export``, complete (every ONNX file of its manifest, at its size)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(
            f"{text!r} does not exist; pass a folder written by `ffsplit-export export`"
        )
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text!r} is a file; pass a folder written by `ffsplit-export export`"
        )
    check_export(path)
    return text


def check_export(path: Path) -> dict:
    """The manifest of an export folder (the one reader, :meth:`Manifest.read`); ArgumentTypeError
    if it is not one or is incomplete."""
    from ..manifest import Manifest, ManifestError

    try:
        return Manifest.read(path)
    except ManifestError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ------------------------------------------------------------------------------ shared options


def add_compress_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by analyze / export / eval / recover (the table of DESIGN.md)."""
    from ..formats import EmbeddingFormat, HeavyFormat, LightFormat, OtherLinearFormat, PruneMethod
    from ..formats.names import Int4Grid, Quantizer

    p.add_argument("--task", default="auto", help="optimum task name, or auto (default)")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--heavy-fraction",
        type=fraction,
        default=None,
        help="fraction of FFN neurons kept dense per layer (default 0.1)",
    )
    g.add_argument(
        "--size-budget",
        type=fraction,
        default=None,
        help="target FFN bytes as a fraction of dense fp32; the planner allocates heavy neurons across layers",
    )
    p.add_argument(
        "--planner",
        choices=("measured", "proxy"),
        default="measured",
        help="with --size-budget: measured (default) picks heavy fraction, light format and sparsity per "
        "FFN by measured FFN output error on calibration inputs; proxy moves single neurons by score^2",
    )
    p.add_argument(
        "--planner-formats",
        default=None,
        help="comma list of light formats the measured planner may pick (default: --light-format and those "
        "of sparse-int8, sparse-int4, int8, int4 that run on --target)",
    )
    p.add_argument(
        "--light-format",
        type=format_name(LightFormat),
        default=None,
        help="sparse-int8, sparse-int4, sparse-fp32, 2:4-int8, int8, int4, lowrank, dense "
        "(default: the preset's; without one sparse-int8)",
    )
    p.add_argument(
        "--light-sparsity",
        type=fraction,
        default=None,
        help="unstructured sparsity of the light part (default: the preset's; without one 0.5)",
    )
    p.add_argument(
        "--prune-method",
        type=format_name(PruneMethod),
        default=None,
        help="magnitude, wanda, sparsegpt (default: the preset's; without one wanda)",
    )
    p.add_argument(
        "--heavy-format",
        type=format_name(HeavyFormat),
        default=None,
        help="fp32, fp16, int8 (default: the preset's; without one fp32)",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="prune FFN by FFN from the statistics of the already compressed model (slower, more accurate)",
    )
    p.add_argument(
        "--other-linear",
        type=format_name(OtherLinearFormat),
        default=None,
        help="fp32, int8, int4: attention and lm_head as MatMulNBits (default: the preset's; without one fp32)",
    )
    p.add_argument(
        "--lm-head",
        type=format_name(OtherLinearFormat),
        default=None,
        help="fp32, int8, int4: the lm_head (output projection) alone, e.g. --other-linear int8 --lm-head "
        "int4 keeps a tied int4 embedding table shared while attention is int8 (default: as --other-linear)",
    )
    p.add_argument(
        "--embedding",
        type=format_name(EmbeddingFormat),
        default=None,
        help="fp32, int8, int4: the token embedding table as block-wise int8 / int4 (GatherBlockQuantized; "
        "int4 shares the table of a tied lm_head quantized by --other-linear int4 when --group-size "
        "divides the width; default: the preset's; without one fp32)",
    )
    p.add_argument(
        "--group-size",
        type=group_size,
        default=None,
        help="int4 group size: 32, 64, 128 (default: the preset's; without one 128)",
    )
    p.add_argument(
        "--quantizer",
        type=format_name(Quantizer),
        default=None,
        help="rtn (round-to-nearest), gptq (error-compensated codes from the calibration Hessians) "
        "(default: the preset's; without one rtn)",
    )
    p.add_argument(
        "--gptq-damp",
        type=fraction,
        default=None,
        help="GPTQ / SparseGPT damping, a fraction of the Hessian's mean diagonal added to it, 0 <= d < 1 "
        "(default 0.01; SmolLM2 joint SparseGPT + GPTQ at 50 %% light sparsity: 0.1 gave x1.300 of dense, "
        "0.01 x1.315)",
    )
    p.add_argument(
        "--int4-grid",
        type=format_name(Int4Grid),
        default=None,
        help="int4 MatMulNBits grid: symmetric (codes -7..7), asymmetric (a uint4 zero point per group, "
        "all 16 levels), asymmetric-mse (the same, each group's range by a clipping search) "
        "(default: the preset's; without one symmetric)",
    )
    p.add_argument(
        "--heavy-selection",
        type=heavy_selection,
        default="score",
        help="score (default), act_norm, random (for ablations)",
    )
    p.add_argument(
        "--calibration",
        type=data_source,
        default=None,
        help=(
            "text file (one sample per line), WAV folder, datasets dir, or an offline text source "
            "(bible, fortunes, gensim: the half disjoint from eval's), or builtin (the built-in sentences); "
            "default: decoder-only language models write their own (continuing the built-in sentences, "
            "seeded), others use the built-in sample"
        ),
    )
    p.add_argument("--num-samples", type=positive_int, default=64, help="calibration samples (default 64)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-length", type=positive_int, default=128, help="calibration tokens per text sample")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def split_config_from_args(args):
    from ..config import CompressionConfig

    return CompressionConfig.from_args(args).split_config()


def compress_kwargs(args) -> dict:
    """``compress()`` keyword arguments of the parsed options, via the one CompressionConfig."""
    from ..config import CompressionConfig

    return dict(CompressionConfig.from_args(args).compress_kwargs(), progress=not args.quiet)


def preset_name(text: str) -> str:
    from ..presets import NO_PRESET, preset_names

    return one_of((*preset_names(), NO_PRESET))(text)


def preset_list(text: str) -> list[str]:
    """A comma list of preset names (``accurate,balanced,fast``); empty for none."""
    from ..presets import preset_names

    return [one_of(preset_names())(part) for part in (p.strip() for p in text.split(",")) if part]


def add_preset_argument(p: argparse.ArgumentParser) -> None:
    """``--preset``: a named, measured recipe (ffsplit_export.presets); explicit options override its fields."""
    from ..presets import DEFAULT_PRESET

    p.add_argument(
        "--preset",
        type=preset_name,
        default=DEFAULT_PRESET,
        help=f"accurate, balanced, fast: recipes measured on the speed/accuracy front (README); none: "
        f"each option's own default. Options given explicitly override the preset's (default {DEFAULT_PRESET})",
    )


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``ffsplit-export export`` and ``optimum-cli export ffsplit``."""
    from ..export.validate import Tolerances
    from ..formats import Target

    tol = Tolerances()

    p.add_argument(
        "model", help="built-in name (tiny-t5, smollm2-135m, whisper-tiny.en, ...), model dir or hub id"
    )
    p.add_argument("output", type=new_file_or_dir, help="output directory (written atomically)")
    add_compress_arguments(p)
    add_preset_argument(p)
    p.add_argument(
        "--target",
        type=format_name(Target),
        default="ort-cpu",
        help="ort-cpu (default, ffsplit custom ops), portable, tensorrt",
    )
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.add_argument(
        "--atol",
        type=nonnegative_float,
        default=None,
        help=(
            f"validation tolerance: |ONNX Runtime - PyTorch| <= ATOL + {tol.rtol:g} x max|PyTorch| on the "
            f"exact float32 path (default {tol.atol:g}); int8 compute (--nbits-accuracy-level 4) is also "
            f"judged by relative L2 error <= {tol.approx_rel_l2:g} and top-1 agreement >= {tol.approx_top1:g}"
        ),
    )
    p.add_argument(
        "--opset",
        type=opset,
        default=None,
        help=f"ONNX opset >= {MIN_OPSET} (default: optimum's for the model)",
    )
    p.add_argument(
        "--nbits-accuracy-level",
        type=accuracy_level,
        default=None,
        help="MatMulNBits accuracy_level: 0 = exact fp32 compute, 4 = int8 activations (faster) "
        "(default: the preset's; without one 0)",
    )
    p.add_argument(
        "--trt-dense-24",
        action="store_true",
        help="with --target tensorrt and 2:4-int8: dense 2:4 weights for TensorRT's sparse tensor cores",
    )
    p.add_argument(
        "--fused-ffn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ort-cpu: one node per split FFN: ffsplit::FusedFFNNBits (the presets: heavy fp32 / int8, light "
        "int8 / int4) or ffsplit::FusedFFN (heavy fp32, light sparse-int8); tensorrt: FusedFFNNBits only "
        "(pass --light-format int4 / int8, --heavy-format fp32 / int8), written as its two plugin nodes "
        "(default: on for ort-cpu exports of decoder-only models and Whisper with light int4 + heavy int8 at "
        "--nbits-accuracy-level 4, i.e. presets balanced and fast, else off; --no-fused-ffn keeps the "
        "MatMulNBits subgraph)",
    )
    p.add_argument(
        "--activation-sparsity",
        type=activation_sparsity,
        default="0",
        help="0 (default, off), 'exact' (skip light neurons whose activation is exactly zero; lossless, "
        "ReLU models) or a fraction 0 < F < 1 of light neurons skipped per token (per-layer thresholds on "
        "|act(gate)| or |act(up)| calibrated on the calibration data; ort-cpu, tensorrt); implies --fused-ffn",
    )
    p.add_argument(
        "--skip-criterion",
        type=skip_criterion,
        default=None,
        help="with --activation-sparsity F, gated FFNs of the presets: mixed (default: a quarter of F by "
        "|act(gate)|, saving up row and down column, the rest by |act(gate) * up|, saving the down column), "
        "gate (CATS: |act(gate)| only) or product (|act(gate) * up| only)",
    )
    p.add_argument(
        "--input-sparsity",
        type=input_sparsity,
        default="0",
        help="0 (default, off) or a fraction 0 < F < 1 of the FFN input's channels skipped per token by "
        "the light up projection of ungated FFNs (MPT, Whisper, GPT-2, OPT, T5 v1.0; TEAL-style per-layer "
        "thresholds on |x| calibrated on the calibration data; ort-cpu, tensorrt, FusedFFNNBits); implies --fused-ffn",
    )
    p.add_argument(
        "--no-fuse-attention",
        action="store_true",
        help="ort-cpu: keep optimum's graph around the FFN (by default RMSNorm, rotary and attention with "
        "the KV cache are fused into ONNX Runtime's SkipSimplifiedLayerNormalization / GroupQueryAttention, "
        "Q/K/V and each FFN part's gate/up MatMulNBits stacked into one; padded batches work)",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="show PyTorch tracer warnings and optimum's messages"
    )


def export_options_from_args(args):
    """The ExportOptions of the options that :func:`add_export_arguments` adds."""
    from ..export.core import ExportOptions
    from ..presets import preset_accuracy_level

    level = args.nbits_accuracy_level
    if level is None:
        level = preset_accuracy_level(getattr(args, "preset", None), args.target)
    return ExportOptions(
        target=args.target,
        validate=not args.no_validate,
        overwrite=args.overwrite,
        atol=args.atol,
        opset=args.opset,
        nbits_accuracy_level=level,
        trt_dense_24=args.trt_dense_24,
        fused_ffn=getattr(args, "fused_ffn", None),
        activation_sparsity=getattr(args, "activation_sparsity", "0"),
        skip_criterion=getattr(args, "skip_criterion", None),
        input_sparsity=getattr(args, "input_sparsity", "0"),
        fuse_attention=False if getattr(args, "no_fuse_attention", False) else None,
    )
