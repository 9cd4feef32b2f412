"""Build the CPU decode kernels this CPU can use, once, ahead of the first request.

``make venv`` (and so ``make demo``, ``make test``) runs this: a fresh clone then pays the C++ build
(~30 s per extension on 2 cores) here, with a line of progress, and not inside ``Predictor.setup()``.
PyTorch keeps the builds under ``~/.cache/torch_extensions`` (``TORCH_EXTENSIONS_DIR``) and rebuilds only
when a source or a flag changed, so a second run takes a second or two.

Which extensions: the fp32 kernels on every CPU, the bf16 ones where the CPU has AVX512-BF16 (as
``deepseek_vl2.kernels`` decides at run time, ``DEEPSEEK_VL2_CPU_ISA`` and ``DEEPSEEK_VL2_CPU_KERNEL=0``
included). One that cannot be built here (no C++ compiler, ...) is reported and skipped: the model then
runs on PyTorch's own kernels, so this never fails the setup. ``--strict`` exits 1 instead (CI).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepseek_vl2 import kernels  # noqa: E402

EXTENSIONS = {"f32": kernels.fp32_extension, "bf16": kernels.avx512_bf16_extension}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strict", action="store_true", help="exit 1 when a kernel this CPU could use did not build")
    args = parser.parse_args(argv)
    failed = False
    for kind, build in EXTENSIONS.items():
        skip = kernels.kernel_unavailable(kind)
        if skip is not None:
            print(f"CPU kernels ({kind}): not built: {skip}", flush=True)
            failed |= args.strict and kind == "f32" and "switched off" not in skip
            continue
        print(f"CPU kernels ({kind}): building or checking the build (~30 s the first time) ...", end=" ", flush=True)
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the reason is printed below)
            extension = build()
        if extension is None:
            print(f"failed: {kernels.unavailable_reason(kind)}; PyTorch's kernels will be used", flush=True)
            failed |= args.strict
        else:
            print(f"ready in {time.perf_counter() - started:.1f} s ({Path(extension.__file__).parent})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
