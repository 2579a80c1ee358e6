"""Streaming weights: a model whose decoder layers are read from disk one at a time.

misq never needs a whole model in host memory. :class:`StreamedModel` builds the model from
its config with every parameter on the ``meta`` device (no storage), reads the parts that are
not decoder layers (embeddings, final norm, lm_head; tied embeddings re-tied) into host memory,
and gives decoder layer ``i`` real weights only while a caller needs it
(:meth:`StreamedModel.load` / :meth:`StreamedModel.release`, the
:class:`misq.execution.LayerSource` protocol). Buffers (rotary ``inv_freq``) are computed at
construction on the CPU, as an ordinary model computes them: they are not stored.

Reads go through ``safetensors.safe_open`` (memory-mapped) but each read opens and closes the
file and copies the tensors out: a mapping kept open would leave every page it ever touched
counted in the process's resident memory, so that after one pass over a 13B model the RSS
would show 26 GB of page cache.

Nothing is attached to the model: whoever loads it keeps the :class:`StreamedModel` and hands
it as ``source=`` to everything that runs the layers (the job layer's
:class:`misq.jobs.loading.LoadedModel` carries it).

After a layer is compressed, the run writes it to ``RUN_DIR/resume/layer_NNN.safetensors``
(:mod:`misq.runs.resume`) and :meth:`StreamedModel.use_file` points layer ``i`` at that file: the
evaluation, size accounting and packed save that follow read compressed layers from there.

Host memory of a streamed compression: embeddings + lm_head + one layer (twice, briefly, while
it is copied) + what the calibration needs; a 13B fp16 model needs ~2 GB of weights, not 26.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from misq.config import ModelConfig
from misq.dtypes import torch_dtype
from misq.errors import MisqError
from misq.models import layout, loading
from misq.models.layout import LAYER_PREFIX, layer_prefix
from misq.models.loading import misq_section_of
from misq.models.safetensors_files import INDEX_NAME, WEIGHTS_NAME, SafetensorsFiles, check_covers_layers

log = logging.getLogger(__name__)

# --stream auto streams when the weights (at the run's dtype) exceed this share of the host
# memory available now: loading needs the weights plus room for the calibration and the OS.
AUTO_STREAM_FRACTION = 0.5


# ----------------------------------------------------------------------------- finding checkpoints


def resolve_checkpoint(model: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """A local folder, or a hub id's snapshot folder in the HF cache (offline lookup); None if neither."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if loading._looks_local(model):
        raise MisqError(f"model path {model!r} does not exist: give a local checkpoint folder or a hub id such as meta-llama/Llama-2-7b-hf")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True, cache_dir=cache_dir))
    except (OSError, ValueError, ImportError) as err:  # not cached (LocalEntryNotFoundError), bad id, no hub lib
        log.debug("%s is not in the local HF cache: %s", model, err)
        return None


def has_safetensors(folder: Path) -> bool:
    return (folder / WEIGHTS_NAME).is_file() or (folder / INDEX_NAME).is_file()


def available_host_bytes() -> int | None:
    """Memory this process can still take: MemAvailable, capped by a cgroup v2 limit; None if unknown."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            room = int(limit) - used
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def stream_folder(cfg: ModelConfig, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Decide ``--stream``: the checkpoint folder to stream from, or None to load in memory.

    ``on`` streams or fails with the reason; ``auto`` streams a safetensors checkpoint whose
    weights exceed :data:`AUTO_STREAM_FRACTION` of the available host memory; ``off`` never.
    """
    if cfg.stream == "off" or cfg.device_map is not None:
        return None
    explicit = cfg.stream == "on"
    from misq import distributed

    if distributed.launched():  # every rank would read every layer; the ranks share no layer store
        if explicit:
            raise MisqError("--stream runs in one process: drop --stream when launching with torchrun")
        return None
    folder = resolve_checkpoint(cfg.model, cache_dir)
    if folder is None:
        if explicit:
            raise MisqError(f"{cfg.model!r} is not a local folder and not in the local Hugging Face cache: "
                            f"download it first (huggingface-cli download {cfg.model}) or drop --stream")
        return None
    if misq_section_of(folder) is not None:
        if explicit:
            raise MisqError(f"{folder} is a misq packed checkpoint: it loads whole (it is small); drop --stream")
        return None
    if not has_safetensors(folder):
        if explicit:
            found = ", ".join(sorted(p.name for p in folder.glob("*.bin"))) or "no weight files"
            raise MisqError(f"{folder} has no safetensors weights ({found}): --stream reads safetensors only; "
                            "convert the checkpoint (load it and save_pretrained it) or drop --stream")
        return None
    if explicit:
        return folder
    need = SafetensorsFiles.of_folder(folder).weight_bytes(torch_dtype(cfg.weight_dtype))
    avail = available_host_bytes()
    if avail is None or need <= AUTO_STREAM_FRACTION * avail:
        return None
    log.info("streaming the weights: %.1f GiB of weights, %.1f GiB of host memory available (--stream auto)",
             need / 1024**3, avail / 1024**3)
    return folder


# ----------------------------------------------------------------------------- the streamed model


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside lands on ``meta``; buffers (rotary tables) stay real.

    Modules create their parameters with ``torch.empty`` on the host first; untouched pages
    cost no memory, and the tensor is dropped right after for its meta twin.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and not p.is_meta:
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _owner(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    path, _, leaf = dotted.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf


def _set_parameter(root: nn.Module, dotted: str, value: Tensor, requires_grad: bool) -> None:
    module, leaf = _owner(root, dotted)
    module._parameters[leaf] = nn.Parameter(value, requires_grad=requires_grad)


def _return_freed_memory_to_os() -> None:
    """Make glibc serve every allocation above 1 MiB with its own mapping, unmapped when freed.

    By default glibc raises its mmap threshold (up to 32 MiB) each time such a block is freed,
    so that the next layer's tensors come from the heap, whose freed space it keeps: streaming a
    model whose tensors are under 32 MiB grew the RSS by about a layer per pass (measured here:
    +200 MB per pass over 12 layers of 100 MB; flat with the fixed threshold).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3 = M_MMAP_THRESHOLD; setting it stops the dynamic raise
    except (OSError, AttributeError):  # not glibc (musl): nothing to tune
        pass


def is_materialized(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` has real storage."""
    return any(not p.is_meta for p in module.parameters())


class StreamedModel:
    """A transformers causal LM built on ``meta`` whose decoder layers are read on demand.

    ``model`` has real embeddings, final norm, lm_head and buffers on the CPU in ``dtype``;
    each decoder layer is ``meta`` except between :meth:`load` and :meth:`release`.
    """

    def __init__(self, folder: Path, dtype: torch.dtype, *, trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        self.folder, self.dtype = folder, dtype
        self.files = SafetensorsFiles.of_folder(folder)
        _return_freed_memory_to_os()
        hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        layout.check_architecture(hf_config)
        check_covers_layers(folder, int(getattr(hf_config, "num_hidden_layers", 0) or 0), layer_prefix)
        with _parameters_on_meta(), no_init_weights():
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)
        model.config._name_or_path = str(folder)
        model.config.use_cache = False
        self.model = model.eval()
        self.layers = layout.decoder_layers(model)
        self._layer_files: dict[int, SafetensorsFiles] = {}
        # Layers whose file is still being written: (its path, what to call before reading it).
        self._coming: dict[int, tuple[Path, Callable[[], None]]] = {}
        # The one layer read ahead in the background (prefetch): (index, the files it is read from, its tensors).
        self._ahead: tuple[int, SafetensorsFiles, Future[dict[str, Tensor]]] | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._materialize_outside_layers()
        log.info("streaming %s: %d decoder layers read one at a time", folder, len(self.layers))

    def _materialize_outside_layers(self) -> None:
        """Read every parameter that is not in a decoder layer; tied ones are read once."""
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        if tied:
            self.model.tie_weights()  # from_config without init leaves lm_head untied: tie it so it is not read
        seen: set[int] = set()
        names = []
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if name.startswith(LAYER_PREFIX) or id(p) in seen:
                continue
            seen.add(id(p))
            names.append((name, p.requires_grad))
        tensors = self.files.read([n for n, _ in names], self.dtype)
        loading.check_finite(tensors.items(), str(self.folder))
        for name, requires_grad in names:
            _set_parameter(self.model, name, tensors[name], requires_grad)
        if tied:
            self.model.tie_weights()  # the new embedding Parameter replaced the tied one: tie lm_head again
        left = [n for n, p in self.model.named_parameters() if p.is_meta and not n.startswith(LAYER_PREFIX)]
        if left:
            raise MisqError(f"{self.folder}: {', '.join(left)} could not be read for streaming: drop --stream")

    # -- the LayerSource protocol ----------------------------------------------------------
    def load(self, i: int) -> None:
        """Give decoder layer ``i`` its weights (from its compressed file once there is one);
        those a :meth:`prefetch` of ``i`` read already, and any error it met, are taken here."""
        layer, prefix = self.layers[i], layer_prefix(i)
        params = [(n, p) for n, p in layer.named_parameters()]
        files = self._files_of(i)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == i and ahead[1] is files:
            tensors = ahead[2].result()  # re-raises the reader's error (a damaged file, NaN) as a direct read would
        else:
            _drop(ahead)
            tensors = self._read_layer([prefix + n for n, _ in params], files)
        for name, p in params:
            t = tensors[prefix + name]
            if t.shape != p.shape:
                raise MisqError(f"{prefix + name} is {list(t.shape)} in the checkpoint but the config makes it "
                                f"{list(p.shape)}: config.json and the weights do not match")
            _set_parameter(layer, name, t, p.requires_grad)

    def release(self, i: int) -> None:
        """Drop decoder layer ``i``'s weights (back to ``meta``)."""
        layer = self.layers[i]
        for name, p in list(layer.named_parameters()):
            _set_parameter(layer, name, torch.empty_like(p, device="meta"), p.requires_grad)

    def use_file(self, i: int, path: Path, written: Callable[[], None] | None = None) -> None:
        """From now on, layer ``i`` is read from ``path`` (a compressed layer's safetensors file).
        ``written``: the file may still be being written; this is called (and must return once
        it is complete) before the first read of it."""
        self._layer_files.pop(i, None)
        self._coming[i] = (Path(path), written or (lambda: None))
        if self._ahead is not None and self._ahead[0] == i:  # read from the old file: stale
            _drop(self._ahead)
            self._ahead = None

    def prefetch(self, i: int) -> None:
        """Start reading decoder layer ``i``'s tensors in a background thread; the next
        :meth:`load` of ``i`` takes them. At most one layer is read ahead (bounded host memory:
        the loaded layer plus this one): an earlier read that was not loaded is dropped."""
        if not 0 <= i < len(self.layers):
            return
        files = self._files_of(i)
        if self._ahead is not None:
            if self._ahead[0] == i and self._ahead[1] is files:
                return
            _drop(self._ahead)
            self._ahead = None
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="misq-layer-reader")
        names = [layer_prefix(i) + n for n, _ in self.layers[i].named_parameters()]  # here: the thread touches no module
        self._ahead = (i, files, self._reader.submit(self._read_layer, names, files))

    def _files_of(self, i: int) -> SafetensorsFiles:
        """Where layer ``i`` is read from now: its own file (once complete) or the checkpoint's."""
        if i in self._coming:
            path, written = self._coming.pop(i)
            written()
            self._layer_files[i] = SafetensorsFiles([path])
        return self._layer_files.get(i) or self.files

    def _read_layer(self, names: list[str], files: SafetensorsFiles) -> dict[str, Tensor]:
        """The tensors ``names`` from ``files`` in host memory, checked finite (any thread: the copies release the GIL)."""
        tensors = files.read(names, self.dtype)
        loading.check_finite(tensors.items(), str(self.folder))
        return tensors


def _drop(ahead: tuple[int, SafetensorsFiles, Future] | None) -> None:
    """Forget a read-ahead that will not be loaded; waits for it so that no third layer is ever in memory."""
    if ahead is not None and not ahead[2].cancel():
        wait_for([ahead[2]])


def open_streamed(folder: Path, cfg: ModelConfig) -> tuple[StreamedModel, Any]:
    """(streamed model, tokenizer) for a safetensors checkpoint folder (``cfg.model`` resolved)."""
    streamed = StreamedModel(folder, torch_dtype(cfg.weight_dtype), trust_remote_code=cfg.trust_remote_code)
    return streamed, loading.load_tokenizer(replace(cfg, model=str(folder)))


# ----------------------------------------------------------------------------- measuring


def peak_memory(device: str | None = None) -> dict[str, Any]:
    """Peak host RSS of this process since it started and peak GPU memory since the last reset (GiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes
    out: dict[str, Any] = {"peak_rss_gib": rss_bytes / 1024**3, "peak_gpu_gib": None, "peak_gpu_reserved_gib": None}
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(dev) / 1024**3
        out["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved(dev) / 1024**3
    return out


def reset_peak_gpu(device: str) -> None:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(torch.device(device))
