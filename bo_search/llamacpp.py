"""The one place that talks to llama.cpp: load a GGUF with llama.cpp's own kernels, score fixed
token windows, time batch-1 decoding, and quantize with ``llama_model_quantize``.

llama.cpp comes from the ``llama-cpp-py-sync`` wheel (upstream build b11739, CPU, AVX2, OpenMP),
whose CFFI declarations of ``llama.h`` we use directly (``ffi.dlopen`` of its ``libllama.so``); its
high-level Python API is not used.

**The glibc load fix.** The wheel's libraries were linked against glibc 2.38, which C23 gave new
names for ``strtol``, ``strtoul``, ``strtoull`` and ``sscanf`` (``__isoc23_*``, differing only in
accepting a ``0b`` prefix). On an older glibc (Debian 12 has 2.36) they fail to load. On such a
system, and only there, :func:`library_dir` copies the libraries once into the cache and edits the
copies: each undefined ``__isoc23_NAME`` symbol is pointed at ``NAME`` (the same string, nine bytes
further on) with no version, and the now unused ``GLIBC_2.38`` version requirement is flagged weak
(``VER_FLG_WEAK``), which the dynamic loader accepts when that version is absent. Nothing is
compiled and nothing installed is modified; on glibc >= 2.38 the package's own files are loaded.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import shutil
import statistics
import struct
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bo_search.model import cache_dir
from bo_search.types import UserError, did_you_mean

log = logging.getLogger(__name__)

PACKAGE = "llama_cpp_py_sync"
PIN = "llama-cpp-py-sync==0.11739"
INSTALL_HINT = f"install it with `make install` (or `pip install {PIN}`)"
#: llama.cpp's quantization presets this tool can ask for (``llama-quantize`` names)
PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")

# ---------------------------------------------------------------------------------------------
# the load fix (pure ELF edits; see the module docstring)
# ---------------------------------------------------------------------------------------------

_ISOC23 = b"__isoc23_"
_SHT_DYNSYM, _SHT_VERSYM, _SHT_VERNEED = 11, 0x6FFFFFFF, 0x6FFFFFFE
_VER_FLG_WEAK = 0x2
_VER_NDX_GLOBAL = 1


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc; None on another C library."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        return None
    name, _, ver = text.partition(" ")
    if name != "glibc":
        return None
    major, _, minor = ver.partition(".")
    try:
        return int(major), int(minor.split(".")[0])
    except ValueError:
        return None


def needs_glibc_fix(version: tuple[int, int] | None) -> bool:
    """Only glibc older than 2.38 needs the edited copies."""
    return version is not None and version < (2, 38)


def patch_isoc23(path: Path) -> list[str]:
    """Edit one ELF64 shared library in place (see the module docstring). Returns the symbols
    redirected; an empty list leaves the file byte for byte as it was."""
    b = bytearray(path.read_bytes())
    if b[:4] != b"\x7fELF" or b[4] != 2 or b[5] != 1:
        raise UserError(f"{path} is not a 64-bit little-endian ELF library; reinstall {PIN}")
    (shoff,) = struct.unpack_from("<Q", b, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", b, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", b, shoff + i * shentsize) for i in range(shnum)]
    # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
    dynsym = next((s for s in sections if s[1] == _SHT_DYNSYM), None)
    if dynsym is None:
        return []
    strtab = sections[dynsym[6]][4]
    versym = next((s[4] for s in sections if s[1] == _SHT_VERSYM), None)

    def name_at(off: int) -> bytes:
        start = strtab + off
        return bytes(b[start : b.index(0, start)])

    changed: list[str] = []
    for i in range(dynsym[5] // 24):
        at = dynsym[4] + 24 * i
        st_name, _info, _other, st_shndx = struct.unpack_from("<IBBH", b, at)
        name = name_at(st_name)
        if st_shndx == 0 and name.startswith(_ISOC23):  # an undefined __isoc23_NAME: use NAME
            struct.pack_into("<I", b, at, st_name + len(_ISOC23))
            if versym is not None:
                struct.pack_into("<H", b, versym + 2 * i, _VER_NDX_GLOBAL)
            changed.append(name.decode())
    if not changed:
        return []
    for sec in sections:
        if sec[1] != _SHT_VERNEED:
            continue
        at = sec[4]
        for _ in range(sec[7]):  # sh_info: number of Verneed entries
            _ver, cnt, _file, aux, nxt = struct.unpack_from("<HHIII", b, at)
            a = at + aux
            for _ in range(cnt):
                _hash, flags, _other, vname, anext = struct.unpack_from("<IHHII", b, a)
                if name_at(vname) == b"GLIBC_2.38":
                    struct.pack_into("<H", b, a + 4, flags | _VER_FLG_WEAK)
                a += anext
            if not nxt:
                break
            at += nxt
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(b)
    os.replace(tmp, path)
    return changed


def package_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"llama.cpp is not installed: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def library_dir() -> Path:
    """The directory whose ``libllama.so`` this process loads: the package's own, or (glibc < 2.38)
    the edited copies in the cache, made once per installed build."""
    src = package_dir()
    libs = sorted(src.glob("lib*.so*"))
    if not (src / "libllama.so").is_file():
        raise UserError(f"llama.cpp's library is missing from {src}: reinstall it ({INSTALL_HINT})")
    if not needs_glibc_fix(glibc_version()):
        return src
    key = hashlib.sha1(repr([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in libs]).encode()).hexdigest()[:12]
    dst = cache_dir() / "llamacpp" / f"glibc-fix-{key}"
    if (dst / "libllama.so").is_file():
        return dst
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in libs:
        shutil.copy2(p, tmp / p.name)
        fixed = patch_isoc23(tmp / p.name)
        if fixed:
            log.info("%s: %s -> plain names (glibc %s)", p.name, ", ".join(fixed), glibc_version())
    try:
        os.replace(tmp, dst)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


# ---------------------------------------------------------------------------------------------
# the library
# ---------------------------------------------------------------------------------------------


class _Log:
    """llama.cpp's log lines, kept (not printed) so that a failure can quote the reason."""

    def __init__(self) -> None:
        self.lines: deque[tuple[int, str]] = deque(maxlen=200)

    def last_error(self) -> str:
        """The first error since the log was cleared (llama.cpp logs the cause first, then that it
        failed), else the last line."""
        errs = [t for lvl, t in self.lines if lvl >= 4]  # GGML_LOG_LEVEL_ERROR
        text = errs[0] if errs else (self.lines[-1][1] if self.lines else "")
        return " ".join(text.split())


@dataclass(frozen=True)
class _Lib:
    ffi: Any
    lib: Any
    log: _Log
    callback: Any  # keeps the C callback alive


@functools.lru_cache(maxsize=1)
def _load() -> _Lib:
    try:
        from llama_cpp_py_sync._cffi_bindings import ffi
    except ImportError as err:
        raise UserError(f"llama.cpp is not installed ({err}): {INSTALL_HINT}") from None
    path = library_dir() / "libllama.so"
    try:
        lib = ffi.dlopen(str(path))
    except OSError as err:
        raise UserError(f"llama.cpp failed to load ({str(err).splitlines()[0][:300]}): reinstall it ({INSTALL_HINT})") from None
    sink = _Log()

    @ffi.callback("void(enum ggml_log_level, const char *, void *)")
    def on_log(level: int, text: Any, _ud: Any) -> None:
        if text != ffi.NULL:
            sink.lines.append((int(level), ffi.string(text).decode("utf-8", "replace")))

    lib.llama_log_set(on_log, ffi.NULL)
    lib.llama_backend_init()
    return _Lib(ffi, lib, sink, on_log)


def check_available() -> str:
    """Load llama.cpp (or raise the one-line UserError naming the install step); its version."""
    L = _load()
    return f"llama.cpp {L.ffi.string(L.lib.llama_version()).decode()} ({PIN})" if hasattr(L.lib, "llama_version") else PIN


def system_info() -> str:
    L = _load()
    return L.ffi.string(L.lib.llama_print_system_info()).decode().strip()


# ---------------------------------------------------------------------------------------------
# a model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeTiming:
    """Batch-1 decode speed measured by llama.cpp's own counters (``llama_perf_context``)."""

    tokens_per_s: float  # median over repeats
    sem: float  # standard error of the mean of the repeats' rates
    rates: tuple[float, ...]
    threads: int
    new_tokens: int
    prompt_tokens: int


class LlamaModel:
    """A GGUF loaded by llama.cpp (CPU, ``threads`` threads) with one context of ``n_ctx`` tokens."""

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int = 1):
        L = self._L = _load()
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"GGUF file not found: {self.path}")
        if threads < 1:
            raise UserError(f"llama.cpp needs at least one thread, got {threads}")
        self.threads = threads
        mp = L.lib.llama_model_default_params()
        mp.n_gpu_layers = 0
        L.log.lines.clear()
        self.model = L.lib.llama_model_load_from_file(str(self.path).encode(), mp)
        if self.model == L.ffi.NULL:
            raise UserError(f"llama.cpp refused {self.path}: {L.log.last_error() or 'no reason given'}")
        self.vocab = L.lib.llama_model_get_vocab(self.model)
        self.n_vocab = int(L.lib.llama_vocab_n_tokens(self.vocab))
        cp = L.lib.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = False
        self.n_ctx = n_ctx
        self.ctx = L.lib.llama_init_from_model(self.model, cp)
        if self.ctx == L.ffi.NULL:
            L.lib.llama_model_free(self.model)
            raise UserError(f"llama.cpp cannot make a context for {self.path}: {L.log.last_error() or 'no reason given'}")
        self.batch = L.lib.llama_batch_init(n_ctx, 0, 1)

    def close(self) -> None:
        L = self._L
        if getattr(self, "ctx", None) is not None:
            L.lib.llama_batch_free(self.batch)
            L.lib.llama_free(self.ctx)
            L.lib.llama_model_free(self.model)
            self.ctx = None

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size

    def _clear(self) -> None:
        self._L.lib.llama_memory_clear(self._L.lib.llama_get_memory(self.ctx), True)

    def _decode(self, tokens: Sequence[int], start: int, all_logits: bool) -> None:
        L, b = self._L, self.batch
        n = len(tokens)
        if start + n > self.n_ctx or n > self.n_ctx:
            raise UserError(f"{start + n} positions exceed llama.cpp's context of {self.n_ctx}")
        for i, t in enumerate(tokens):
            if not 0 <= int(t) < self.n_vocab:
                raise UserError(f"token id {int(t)} is outside {self.path.name}'s vocabulary of {self.n_vocab}: is it the same tokenizer?")
            b.token[i] = int(t)
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if all_logits or i == n - 1 else 0
        b.n_tokens = n
        rc = L.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise UserError(f"llama.cpp failed to decode with {self.path.name} (status {rc}): {L.log.last_error()}")

    def _logits_view(self, tokens: Sequence[int]) -> Any:
        """llama.cpp's float32 (len(tokens), n_vocab) logits of one sequence from position 0 (a fresh
        cache), as a view of its buffer (valid until the next decode)."""
        import numpy as np

        L = self._L
        self._clear()
        self._decode(tokens, 0, all_logits=True)
        ptr = L.lib.llama_get_logits(self.ctx)
        buf = L.ffi.buffer(ptr, 4 * len(tokens) * self.n_vocab)
        return np.frombuffer(buf, dtype=np.float32).reshape(len(tokens), self.n_vocab)

    def logits(self, tokens: Sequence[int]) -> Any:
        """A copy of :meth:`_logits_view`."""
        return self._logits_view(tokens).copy()

    def window_nll(self, ids: Any) -> Any:
        """Summed next-token NLL (nats, float64) of each row of ``ids`` (n, L+1): the model reads
        tokens 0..L-1 of a row and every next token 1..L is scored, as ``metrics.window_nll`` does."""
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64)
        sums = np.empty(ids.shape[0], dtype=np.float64)
        for r, row in enumerate(ids):
            z = self._logits_view(row[:-1])
            m = z.max(axis=1)
            lse = m.astype(np.float64) + np.log(np.exp(z - m[:, None]).sum(axis=1, dtype=np.float64))
            sums[r] = float((lse - z[np.arange(z.shape[0]), row[1:]]).sum())
        return sums

    def time_decode(self, prompt: Sequence[int], new_tokens: int = 32, repeats: int = 5, warmup: int = 1) -> DecodeTiming:
        """Greedy batch-1 decode of ``new_tokens`` after ``prompt``, ``warmup`` untimed runs first;
        each repeat's rate is llama.cpp's own decode count over its decode time."""
        import numpy as np

        L = self._L
        if new_tokens < 1 or repeats < 1 or not prompt:
            raise UserError("decode timing needs a prompt, new tokens >= 1 and repeats >= 1")
        if len(prompt) + new_tokens > self.n_ctx:
            raise UserError(f"prompt {len(prompt)} + {new_tokens} new tokens exceed llama.cpp's context of {self.n_ctx}")
        rates: list[float] = []
        for k in range(warmup + repeats):
            self._clear()
            self._decode(prompt, 0, all_logits=False)
            L.lib.llama_synchronize(self.ctx)
            L.lib.llama_perf_context_reset(self.ctx)
            pos = len(prompt)
            for _ in range(new_tokens):
                ptr = L.lib.llama_get_logits_ith(self.ctx, -1)
                nxt = int(np.frombuffer(L.ffi.buffer(ptr, 4 * self.n_vocab), dtype=np.float32).argmax())
                self._decode([nxt], pos, all_logits=False)
                pos += 1
            L.lib.llama_synchronize(self.ctx)
            perf = L.lib.llama_perf_context(self.ctx)
            if k >= warmup:
                if perf.n_eval < new_tokens or perf.t_eval_ms <= 0:
                    raise UserError(f"llama.cpp's counters saw {perf.n_eval} decoded tokens, expected {new_tokens}")
                rates.append(perf.n_eval / (perf.t_eval_ms / 1000.0))
        sem = statistics.stdev(rates) / math.sqrt(len(rates)) if len(rates) > 1 else float("nan")
        return DecodeTiming(statistics.median(rates), sem, tuple(rates), self.threads, new_tokens, len(prompt))


def quantize(src: str | Path, dst: str | Path, preset: str, threads: int = 1) -> float:
    """``llama-quantize SRC DST PRESET`` through ``llama_model_quantize`` (requantizing allowed: the
    source may itself be quantized). Writes to a temporary name renamed at the end; returns seconds."""
    L = _load()
    name = preset.upper()
    if name not in PRESETS:
        raise did_you_mean(preset, PRESETS, "llama.cpp preset")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise UserError(f"GGUF file not found: {src}")
    p = L.lib.llama_model_quantize_default_params()
    p.ftype = getattr(L.lib, f"LLAMA_FTYPE_MOSTLY_{name}")
    p.nthread = threads
    p.allow_requantize = True
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    t0 = time.perf_counter()
    L.log.lines.clear()
    rc = L.lib.llama_model_quantize(str(src).encode(), str(tmp).encode(), L.ffi.new("llama_model_quantize_params *", p))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise UserError(f"llama.cpp could not quantize {src} to {name}: {L.log.last_error() or f'status {rc}'}")
    os.replace(tmp, dst)
    return time.perf_counter() - t0
