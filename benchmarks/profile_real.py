"""Where one DPO step on the real model spends its time and memory (docs/performance.md, "Profile").

Trains ``bench.py``'s real configuration (SmolLM2-135M-Instruct, the real pairs, max_length 512, 4 pairs per
step, fp32) for three optimizer steps with one contestant (``--impl``, bench.py's names): step 1 warms up, step 2
runs under ``torch.profiler`` (the operators with the most self CPU time), step 3 is measured for memory:

* weights, gradients and Adam state: the bytes of the tensors themselves (the gradients as the optimizer
  finds them, the state after its step);
* saved for backward: every distinct storage autograd packs during the step that is not a parameter
  (``torch.autograd.graph.saved_tensors_hooks``), and the part of it whose last dimension is the vocabulary
  (logits, log-probs);
* every tensor an operator returns whose last dimension is the vocabulary (a ``TorchDispatchMode``): the
  largest one and their total;
* the RSS at the start of step 3 and its peak during the step (sampled every 3 ms).

    python benchmarks/profile_real.py --impl hf_dpo
    python benchmarks/profile_real.py --impl trl
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_real import load_real_model, load_real_tokenizer, real_rows  # noqa: E402
from bench_worker import RssSampler, build_trainer  # noqa: E402

MB = 2**20


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class VocabSized(TorchDispatchMode):
    """Every tensor an operator returns whose last dimension is the vocabulary: logits, log-probs, their grads."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest, self.total, self.count = vocab, 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dim() > 0 and tensor.shape[-1] == self.vocab:
                size = tensor.numel() * tensor.element_size()
                self.largest, self.total, self.count = max(self.largest, size), self.total + size, self.count + 1
        return out

    def totals(self) -> dict:
        return {
            "largest_vocab_sized_mb": self.largest / MB,
            "vocab_sized_outputs_mb": self.total / MB,
            "vocab_sized_outputs": self.count,
        }


class SavedTensors:
    """Bytes of the distinct non-parameter storages autograd saves for backward while the context is open."""

    def __init__(self, parameter_storages: set[int], vocab: int):
        self.parameter_storages, self.vocab = parameter_storages, vocab
        self.seen: dict[int, tuple[int, bool]] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.parameter_storages and key not in self.seen:
            self.seen[key] = (storage.nbytes(), tensor.dim() > 0 and tensor.shape[-1] == self.vocab)
        return tensor

    def totals(self) -> dict:
        return {
            "saved_for_backward_mb": sum(n for n, _ in self.seen.values()) / MB,
            "saved_vocab_sized_mb": sum(n for n, vocab in self.seen.values() if vocab) / MB,
            "saved_storages": len(self.seen),
        }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", default="hf_dpo", help="a bench.py contestant: hf_dpo, hf_dpo+gc, trl, trl+gc ...")
    parser.add_argument("--rows", type=int, default=15, help="operators listed")
    parser.add_argument("--json", default=None, help="write the measurements here")
    args = parser.parse_args(argv)

    from transformers import TrainerCallback

    sampler, rss = RssSampler(), {}
    tokenizer, model = load_real_tokenizer(), load_real_model()
    rss["model_mb"] = sampler.rss() / MB
    ref_model = copy.deepcopy(model)
    rss["reference_mb"] = sampler.rss() / MB
    case = dict(impl=args.impl, batch=4, steps=2, warmup=1, seed=0, dtype="fp32", gc=False)
    rows = real_rows(tokenizer, 512, 12)
    trainer = build_trainer(case, model, ref_model, rows, tokenizer, "cpu", 512, real=True)
    rss["trainer_mb"] = sampler.rss() / MB
    parameters = list(model.parameters())
    storages = {p.untyped_storage().data_ptr() for p in parameters + list(ref_model.parameters())}
    saved, vocab_sized = SavedTensors(storages, model.config.vocab_size), VocabSized(model.config.vocab_size)
    found: dict = {}
    hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step == 1:
                profiler.__enter__()
            if state.global_step == 2:
                inner = getattr(optimizer, "optimizer", optimizer)
                inner.register_step_pre_hook(self.before_update)
                rss["step_start_mb"] = sampler.rss() / MB
                sampler.start()
                hooks.__enter__()
                vocab_sized.__enter__()

        def before_update(self, optimizer, *_):
            found["grads_mb"] = tensor_bytes(p.grad for p in parameters if p.grad is not None) / MB

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step == 2:
                profiler.__exit__(None, None, None)
            if state.global_step == 3:
                vocab_sized.__exit__(None, None, None)
                hooks.__exit__(None, None, None)
                rss["step_peak_mb"] = sampler.stop() / MB
                inner = getattr(optimizer, "optimizer", optimizer)
                state_tensors = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
                found["adam_state_mb"] = tensor_bytes(state_tensors) / MB

    trainer.add_callback(Probe())
    trainer.train()
    report = {
        "impl": args.impl,
        "threads": torch.get_num_threads(),
        "weights_mb": tensor_bytes(parameters) / MB,
        "reference_weights_mb": tensor_bytes(ref_model.parameters()) / MB,
        **found,
        **saved.totals(),
        **vocab_sized.totals(),
        **rss,
    }
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48)
    print(table)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(report, profile=table), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
