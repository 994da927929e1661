"""``reglora``: RegLoRA, the parameter half of SEFE (Chen et al., ICML 2025, "SEFE: Superficial and
Essential Forgetting Eliminator for Multimodal Continual Instruction Tuning").

Essential forgetting is the loss of knowledge itself. RegLoRA protects the few weight entries each
task changed most:

1. after task t, for every LoRA module with weights ``A`` (r x in) and ``B`` (out x r), the update
   magnitude ``M = |B A|`` (unscaled, float32) is ranked and its top ``top_ratio`` (2%) entries
   become *key positions*; they are united with the key positions of earlier tasks;
2. the task's LoRA is merged into the base weights (``W += scaling * B A``) and a fresh LoRA
   (``A`` re-drawn, ``B = 0``) is trained on the next task with the loss

       CE + reg_lambda * mean_modules mean_{(i, j) in key positions} |(B A)_ij|

   (``reg_lambda`` = 2.5e3 as in the paper; nothing on the first task, which has no key positions).

The penalty never materialises ``B A``: ``(B A)_ij = sum_r B[i, r] A[r, j]``, so the rows of ``B``
and the columns of ``A`` at the key positions are gathered and multiplied elementwise
(``benchmarks/reglora_overhead.py`` measures the step-time overhead).

Merging is done per LoRA layer in place (``base_layer.weight += scaling * B A``), so the PEFT
wrapper in ``backbone.model`` stays the same object for the whole run; the layer's LoRA is then
re-initialised from a seed that depends only on (seed, number of finished tasks).

State: ``state_tensors`` holds every finished task's LoRA weights (group ``task<k>``, saved as
``task<k>::<module>::A|B``) and the key positions (group ``positions``, saved as ``positions::<module>``,
flat int32 indices into the (out, in) weight). Storing the
per-task LoRAs is more compact than storing the merged deltas (``r (in + out)`` per task instead of
``in x out``, i.e. smaller for fewer than ``in out / (r (in + out))`` tasks: 256 for rank 8 on
4096-wide layers) and lets a resumed run re-merge the same tensors in the same order, which
rebuilds bit-identical base weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from mmcl.streams.stream import Task
from mmcl.config import setting
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import register_method
from mmcl.methods.seq_lora import SequentialLora

ADAPTER = "default"
POSITIONS = "positions"  # state group: module name -> flat key positions (saved as positions::<module>)


@dataclass
class RegLoraConfig:
    """RegLoRA options (defaults from the paper)."""

    top_ratio: float = setting(0.02, help="share of each module's |B A| entries kept as key positions per task")
    reg_lambda: float = setting(2.5e3, help="weight of the penalty on the new LoRA's update at the key positions")

    def __post_init__(self) -> None:
        if not 0.0 <= self.top_ratio <= 1.0:
            raise ConfigError(f"method.options.top_ratio: expected a share in [0, 1], got {self.top_ratio}")
        if self.reg_lambda < 0:
            raise ConfigError(f"method.options.reg_lambda: must be >= 0, got {self.reg_lambda}")


RegLoraConfigT = TypeVar("RegLoraConfigT", bound=RegLoraConfig)  # SEFE's options extend RegLoRA's


# -- pure functions ------------------------------------------------------------------------------
def key_positions(B: torch.Tensor, A: torch.Tensor, top_ratio: float) -> torch.Tensor:
    """Flat indices (sorted, int64) of the ``round(top_ratio * out * in)`` largest entries of ``|B A|``
    (at least one when ``top_ratio > 0``), computed unscaled in float32."""
    magnitude = (B.detach().float() @ A.detach().float()).abs().flatten()
    if top_ratio <= 0:
        return torch.zeros(0, dtype=torch.long, device=magnitude.device)
    k = min(magnitude.numel(), max(1, round(top_ratio * magnitude.numel())))
    return torch.topk(magnitude, k, sorted=False).indices.sort().values


def reglora_penalty(B: torch.Tensor, A: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Mean of ``|(B A)_ij|`` over the flat ``positions`` of the (out, in) product, without forming ``B A``:
    rows of ``B`` and columns of ``A`` are gathered and their products summed over the rank."""
    if positions.numel() == 0:
        return B.new_zeros((), dtype=torch.float32)
    rows, cols = positions // A.shape[1], positions % A.shape[1]
    values = (B.float().index_select(0, rows) * A.float().index_select(1, cols).T).sum(-1)
    return values.abs().mean()


@dataclass(frozen=True)
class KeyIndex:
    """Key positions of many modules as one gather: modules stacked (``B`` row blocks, ``A.T`` row
    blocks) in a fixed order; ``rows`` / ``cols`` = stacked ``B`` row and stacked ``A.T`` row of each
    position, ``weights`` = 1 / (positions of its module * modules)."""

    names: tuple[str, ...]
    rows: torch.Tensor
    cols: torch.Tensor
    weights: torch.Tensor


def key_index(positions: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]]) -> KeyIndex:
    """The :class:`KeyIndex` of the modules with key positions; ``shapes`` = (out, in) per module."""
    names = tuple(name for name, flat in positions.items() if flat.numel())
    rows, cols, weights = [], [], []
    row_offset = col_offset = 0
    for name in names:
        out_features, in_features = shapes[name]
        flat = positions[name]
        rows.append(flat // in_features + row_offset)
        cols.append(flat % in_features + col_offset)
        weights.append(torch.full((flat.numel(),), 1.0 / (flat.numel() * len(names))))
        row_offset += out_features
        col_offset += in_features
    if not names:
        empty = torch.zeros(0, dtype=torch.long)
        return KeyIndex((), empty, empty, torch.zeros(0))
    return KeyIndex(names, torch.cat(rows), torch.cat(cols), torch.cat(weights))


PENALTY_BLOCK = 1 << 19  # key positions gathered at once: bounds the penalty's working memory


def _blocks(total: int):
    return (slice(begin, begin + PENALTY_BLOCK) for begin in range(0, total, PENALTY_BLOCK))


class _WeightedAbsAtKeys(torch.autograd.Function):
    """``sum_k w_k |B_stacked[row_k] . At_stacked[col_k]|`` in blocks of ``PENALTY_BLOCK`` positions. The
    gathered rows and columns of several blocks are not kept for the backward pass, which gathers them again
    block by block: beyond the index (20 bytes per key position) the memory stays that of one block however
    many positions the finished tasks added."""

    @staticmethod
    def forward(ctx, stacked_B, stacked_At, rows, cols, weights):
        total = stacked_B.new_zeros(())
        gathered = ()
        for block in _blocks(cols.numel()):
            gathered = (stacked_B.index_select(0, rows[block]), stacked_At.index_select(0, cols[block]))
            total += (torch.linalg.vecdot(*gathered).abs() * weights[block]).sum()
        ctx.single_block = cols.numel() <= PENALTY_BLOCK  # then the one block's gathers are kept, not redone
        ctx.save_for_backward(stacked_B, stacked_At, rows, cols, weights, *(gathered if ctx.single_block else ()))
        return total

    @staticmethod
    def backward(ctx, grad):
        stacked_B, stacked_At, rows, cols, weights, *kept = ctx.saved_tensors
        grad_B, grad_At = torch.zeros_like(stacked_B), torch.zeros_like(stacked_At)
        for block in _blocks(cols.numel()):
            gathered_B, gathered_At = kept or (stacked_B.index_select(0, rows[block]), stacked_At.index_select(0, cols[block]))
            coefficient = (torch.sign(torch.linalg.vecdot(gathered_B, gathered_At)) * weights[block] * grad).unsqueeze(1)
            grad_B.index_add_(0, rows[block], gathered_At * coefficient)
            grad_At.index_add_(0, cols[block], gathered_B * coefficient)
        return grad_B, grad_At, None, None, None


def stacked_penalty(Bs: list[torch.Tensor], As: list[torch.Tensor], index: KeyIndex) -> torch.Tensor:
    """Mean over modules of ``mean |(B A)_ij|`` at their key positions, as one gather over all modules
    (same value and gradients as averaging :func:`reglora_penalty`; a few large ops instead of many small ones)."""
    stacked_B = torch.cat([B.float() for B in Bs])
    stacked_At = torch.cat([A.float().T for A in As])
    return _WeightedAbsAtKeys.apply(stacked_B, stacked_At, index.rows, index.cols, index.weights)


def merge_lora(layer: torch.nn.Module, A: torch.Tensor, B: torch.Tensor, sign: float = 1.0) -> None:
    """``base.weight += sign * scaling * B A`` for a PEFT LoRA ``layer`` (computed in float32)."""
    base = layer.get_base_layer()
    delta = (B.float() @ A.float()) * (layer.scaling[ADAPTER] * sign)
    if getattr(layer, "fan_in_fan_out", False):
        delta = delta.T
    with torch.no_grad():
        base.weight.add_(delta.to(device=base.weight.device, dtype=base.weight.dtype))


@register_method
class RegLora(SequentialLora[RegLoraConfigT]):
    name = "reglora"
    state_growth = "per-task"
    supports_dora = False
    description = "RegLoRA (SEFE): merge each task's LoRA, penalise the new LoRA at earlier tasks' key positions"
    config_class = RegLoraConfig

    def init_state(self) -> None:
        self.positions: dict[str, torch.Tensor] = {}  # module name -> sorted flat key positions (int64)
        self.merged: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []  # per finished task: name -> (A, B)
        self._layers: dict[str, torch.nn.Module] = {}
        self._index: KeyIndex | None = None  # all modules' key positions as one gather, on the weights' device

    # -- PEFT bookkeeping ----------------------------------------------------------------------
    def setup(self, backbone) -> None:
        super().setup(backbone)
        from peft.tuners.lora import LoraLayer

        self._layers = {}
        for module_name, module in backbone.model.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                if module.lora_A[ADAPTER].weight.dim() != 2:
                    raise ConfigError(f"reglora: LoRA module {module_name} is not a linear layer")
                self._layers[module_name] = module
        self.positions, self.merged, self._index = {}, [], None

    def _weights(self, layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight

    def _fresh_lora(self) -> None:
        """Re-draw every LoRA (A Kaiming-uniform, B = 0) from a seed fixed by the number of finished tasks."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1009 + len(self.merged))
            for layer in self._layers.values():
                layer.reset_lora_parameters(ADAPTER, True)

    def _refresh_gather(self) -> None:
        shapes = {}
        for name, layer in self._layers.items():
            A, B = self._weights(layer)
            shapes[name] = (B.shape[0], A.shape[1])
        index = key_index(self.positions, shapes)
        if not index.names:
            self._index = None
            return
        device = self._layers[index.names[0]].lora_A[ADAPTER].weight.device
        self._index = KeyIndex(index.names, *(t.to(device) for t in (index.rows, index.cols, index.weights)))

    # -- hooks ---------------------------------------------------------------------------------
    def after_task(self, task_index: int, task: Task) -> None:
        finished: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, layer in self._layers.items():
            A, B = self._weights(layer)
            new = key_positions(B, A, self.config.top_ratio).cpu()
            old = self.positions.get(name)
            self.positions[name] = new if old is None else torch.unique(torch.cat([old, new]))
            finished[name] = (A.detach().to("cpu", copy=True), B.detach().to("cpu", copy=True))
            merge_lora(layer, A.detach(), B.detach())
        self.merged.append(finished)
        self._fresh_lora()
        self._refresh_gather()

    def penalty(self) -> torch.Tensor | None:
        """reg_lambda * mean over modules of the mean |(B A)_ij| at their key positions (None on the first task)."""
        if self._index is None or self.config.reg_lambda == 0:
            return None
        weights = [self._weights(self._layers[name]) for name in self._index.names]
        return self.config.reg_lambda * stacked_penalty([B for _, B in weights], [A for A, _ in weights], self._index)

    def extra_loss(self, model: torch.nn.Module, inputs: dict, outputs: Any) -> torch.Tensor | None:
        return self.penalty()

    # -- state ---------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Any]:
        """Per finished task ``task<k>``: module name -> {"A", "B"}; and ``positions``: module name -> key positions."""
        tensors: dict[str, Any] = {
            f"task{index}": {name: {"A": A.contiguous(), "B": B.contiguous()} for name, (A, B) in task_lora.items()}
            for index, task_lora in enumerate(self.merged)
        }
        if self.positions:
            tensors[POSITIONS] = {name: p.to(torch.int32).contiguous() for name, p in self.positions.items()}
        return tensors

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        incoming: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        positions: dict[str, torch.Tensor] = {}
        for key, group in tensors.items():
            if not isinstance(group, dict) or not (key == POSITIONS or (key.startswith("task") and key[4:].isdigit())):
                raise RunDirError(f"reglora: unexpected key {key!r} in saved state")
            if key == POSITIONS:
                positions.update((name, value.to(torch.long)) for name, value in group.items())
                continue
            index = int(key[4:])
            while len(incoming) <= index:
                incoming.append({})
            for name, pair in group.items():
                incoming[index][name] = (pair.get("A"), pair.get("B")) if isinstance(pair, dict) else (None, None)
        unknown = set(positions).union(*incoming) - set(self._layers) if incoming or positions else set()
        if unknown:
            raise RunDirError(f"reglora: saved state names unknown LoRA modules: {sorted(unknown)[:3]}")
        # keep the merges the model already holds when they are a prefix of the saved ones (exact),
        # undo the others (in reverse order), then merge what is missing in order
        keep = 0
        while keep < min(len(self.merged), len(incoming)) and _same(self.merged[keep], incoming[keep]):
            keep += 1
        for task_lora in reversed(self.merged[keep:]):
            for name, (A, B) in task_lora.items():
                merge_lora(self._layers[name], A, B, sign=-1.0)
        for task_lora in incoming[keep:]:
            for name, (A, B) in task_lora.items():
                merge_lora(self._layers[name], A, B)
        self.merged = self.merged[:keep] + incoming[keep:]
        self.positions = positions
        self._fresh_lora()
        self._refresh_gather()

    def state_json(self) -> dict[str, Any]:
        return {"finished_tasks": len(self.merged)}


def _same(a: dict[str, tuple[torch.Tensor, torch.Tensor]], b: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]) for n in a)

