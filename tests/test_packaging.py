"""Packaging: kernels/ installs as fastloss.kernels, never as a top-level `kernels` module."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_no_top_level_kernels(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("fastloss-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert top_level == {"fastloss", next(t for t in top_level if t.endswith(".dist-info"))}
    assert "fastloss/kernels/cross_entropy.py" in names
    assert "fastloss/kernels/common.py" in names


def test_import_without_side_effects(tmp_path):
    # Outside the repository: `import fastloss` works, loads neither triton nor the kernels, and
    # `import kernels` fails because no such top-level module is installed.
    code = (
        "import sys, fastloss, fastloss.kernels\n"
        "assert 'triton' not in sys.modules, 'import fastloss must not import triton'\n"
        "assert 'fastloss.kernels.cross_entropy' not in sys.modules\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError:\n    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
