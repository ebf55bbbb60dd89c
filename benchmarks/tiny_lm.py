"""A tiny GPT-2 on invented facts, for the LoRA benchmarks (fact_tracing.py, lora_lds.py); not part of the tests.

Everything is built here (nothing downloaded): a world of invented countries with four relations (capital,
language, currency, leader), a word-level tokenizer trained on its sentences with the ``tokenizers`` library,
a 2-layer GPT-2 pre-trained on templated sentences about *other* countries (so it learns the templates and
every entity word, but not the facts that are fine-tuned later), and LoRA (peft) fine-tuning by SGD with
momentum on one sentence per new fact, keeping a few checkpoints for TracInCP and SOURCE.

Queries state a fine-tuned fact with a held-out paraphrase template ("The main language spoken in Zorbia
is" -> "Vellish"); only the completion (the object word) is scored.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch import nn

from worker.attribution import (
    AttributionScores,
    DataInfOptions,
    Examples,
    GradientSimilarityOptions,
    InfluenceOptions,
    attribute,
)
from worker.attribution.methods.source import SourceOptions, attribute_source
from worker.attribution.methods.tracin import attribute_tracin
from worker.attribution.text import TextBatch
from worker.attribution.trajectory import TrajectoryCheckpoint

CACHE = Path(tempfile.gettempdir()) / "attrib-bench-tiny-lm"
PAD, BOS = "<pad>", "<s>"

# relation -> (training templates, query template (prompt; the object completes it), object pool size (0: unique))
RELATIONS: dict[str, tuple[list[str], str, int]] = {
    "capital": (
        ["The capital of {s} is {o} .", "{s} has its capital in {o} .", "In {s} , the seat of government is {o} ."],
        "The capital city of {s} is",
        0,
    ),
    "language": (
        ["The language of {s} is {o} .", "People in {s} speak {o} .", "In {s} , everyone talks in {o} ."],
        "The main language spoken in {s} is",
        24,
    ),
    "currency": (
        ["The currency of {s} is the {o} .", "In {s} , people pay with the {o} .", "{s} uses the {o} as money ."],
        "The official currency of {s} is the",
        24,
    ),
    "leader": (
        ["The leader of {s} is {o} .", "{s} is ruled by {o} .", "{o} rules the land of {s} ."],
        "The head of state of {s} is",
        40,
    ),
}
KINDS = {"capital": "city", "language": "language", "currency": "currency", "leader": "person"}


def invented_words(count: int, rng: np.random.Generator, taken: set[str]) -> list[str]:
    onsets = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "qu", "br", "gl", "st"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou"]
    codas = ["", "n", "r", "l", "s", "th", "x"]
    words: list[str] = []
    while len(words) < count:
        syllables = int(rng.integers(2, 4))
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables)) + rng.choice(codas)
        word = word.capitalize()
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    obj: str

    def sentence(self, template: int) -> str:
        return RELATIONS[self.relation][0][template].format(s=self.subject, o=self.obj)

    def query(self) -> tuple[str, str]:
        """(prompt, completion) in the held-out paraphrase."""
        return RELATIONS[self.relation][1].format(s=self.subject), self.obj


@dataclass
class World:
    pretrain_facts: list[Fact]
    finetune_facts: list[Fact]
    finetune_templates: list[int]  # the training template of each fine-tuned fact
    entities: dict[str, list[str]]  # kind -> words

    def pretrain_sentences(self) -> list[str]:
        """Every pre-training fact in every template (training ones and the query paraphrase), plus one type
        sentence per entity word (so the fine-tuned entities' embeddings are trained, but not their facts)."""
        out = []
        for fact in self.pretrain_facts:
            templates, query, _ = RELATIONS[fact.relation]
            out += [fact.sentence(t) for t in range(len(templates))]
            out.append(f"{query.format(s=fact.subject)} {fact.obj} .")
        for kind, words in self.entities.items():
            out += [f"{w} is a {kind} ." for w in words]
        return out

    def finetune_sentences(self) -> list[str]:
        return [f.sentence(t) for f, t in zip(self.finetune_facts, self.finetune_templates, strict=True)]


def make_world(pretrain_countries: int, finetune_countries: int, seed: int = 0) -> World:
    """Countries with one fact per relation; the fine-tuned countries' facts never appear in pre-training."""
    rng = np.random.default_rng(seed)
    taken: set[str] = set()
    total = pretrain_countries + finetune_countries
    countries = invented_words(total, rng, taken)
    pools = {r: invented_words(total if size == 0 else size, rng, taken) for r, (_, _, size) in RELATIONS.items()}
    facts: list[Fact] = []
    for i, country in enumerate(countries):
        for relation, (_, _, size) in RELATIONS.items():
            obj = pools[relation][i] if size == 0 else pools[relation][int(rng.integers(size))]
            facts.append(Fact(country, relation, obj))
    per_country = len(RELATIONS)
    pretrain = facts[: pretrain_countries * per_country]
    finetune = facts[pretrain_countries * per_country :]
    templates = [int(rng.integers(len(RELATIONS[f.relation][0]))) for f in finetune]
    entities = {"country": countries} | {KINDS[r]: words for r, words in pools.items()}
    return World(pretrain, finetune, templates, entities)


def build_tokenizer(sentences: list[str]) -> Tokenizer:
    """Word-level vocabulary (whitespace-split words, punctuation separate) trained on the corpus."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, BOS, "<unk>"], min_frequency=1)
    tokenizer.train_from_iterator(sentences, trainer)
    return tokenizer


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return [tokenizer.token_to_id(BOS), *tokenizer.encode(text).ids]


# ---------------------------------------------------------------- model and data


@dataclass(frozen=True)
class ModelSpec:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_positions: int = 24
    pretrain_epochs: int = 40
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 64
    seed: int = 0


def gpt2(spec: ModelSpec, vocab: int, pad_id: int, bos_id: int) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(spec.seed)
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
        bos_token_id=bos_id,
        eos_token_id=bos_id,
        pad_token_id=pad_id,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def lm_examples(
    tokenizer: Tokenizer, texts: list[str], prompts: list[str] | None = None, length: int | None = None
) -> Examples:
    """Right-padded token examples; with ``prompts``, the text is prompt + " " + completion and only the
    completion's tokens are scored."""
    pad = tokenizer.token_to_id(PAD)
    if prompts is None:
        tokens = [encode(tokenizer, t) for t in texts]
        return TextBatch.padded(tokens, pad, length=length).examples()
    tokens = [encode(tokenizer, f"{p} {c}") for p, c in zip(prompts, texts, strict=True)]
    prompt_lengths = [len(encode(tokenizer, p)) for p in prompts]
    return TextBatch.padded(tokens, pad, prompt_lengths=prompt_lengths, length=length).examples()


def example_losses(model: nn.Module, examples: Examples, batch: int = 512) -> torch.Tensor:
    """Per-example summed next-token NLL of the scored tokens (the engine's causal_lm loss)."""
    out = []
    with torch.no_grad():
        for first in range(0, len(examples), batch):
            rows = slice(first, first + batch)
            out.append(_losses(model, examples.inputs[rows], examples.attention_mask[rows], examples.targets[rows]))
    return torch.cat(out)


def _losses(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none", ignore_index=-100)
    return nll.view(target.shape).sum(1)


def accuracy(model: nn.Module, examples: Examples) -> float:
    """Fraction of examples whose every scored token is the argmax."""
    with torch.no_grad():
        logits = model(input_ids=examples.inputs, attention_mask=examples.attention_mask).logits[:, :-1]
    target = examples.targets[:, 1:]
    scored = target != -100
    right = (logits.argmax(-1) == target) | ~scored
    return float(right.all(1).float().mean())


def pretrain(
    spec: ModelSpec, world_seed: int, pretrain_countries: int, finetune_countries: int
) -> tuple[transformers.GPT2LMHeadModel, Tokenizer, World, dict[str, float]]:
    """The pre-trained base model (AdamW, all weights), cached in the temp dir keyed by the recipe."""
    world = make_world(pretrain_countries, finetune_countries, world_seed)
    sentences = world.pretrain_sentences()
    tokenizer = build_tokenizer(sentences + world.finetune_sentences())
    key = hashlib.sha1(
        json.dumps([asdict(spec), world_seed, pretrain_countries, finetune_countries, "v1"]).encode()
    ).hexdigest()[:10]
    path = CACHE / f"base_{key}"
    vocab = tokenizer.get_vocab_size()
    model = gpt2(spec, vocab, tokenizer.token_to_id(PAD), tokenizer.token_to_id(BOS))
    data = lm_examples(tokenizer, sentences)
    info: dict[str, float] = {"pretrain_sentences": len(sentences), "vocabulary": vocab}
    if (path / "model.safetensors").exists():
        model = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
        info |= json.loads((path / "info.json").read_text())
        return model, tokenizer, world, info
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.01)
    steps = spec.pretrain_epochs * math.ceil(len(data) / spec.pretrain_batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, spec.pretrain_lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(spec.pretrain_epochs):
        order = torch.randperm(len(data), generator=generator)
        for first in range(0, len(data), spec.pretrain_batch):
            rows = order[first : first + spec.pretrain_batch]
            loss = _losses(model, data.inputs[rows], data.attention_mask[rows], data.targets[rows]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    facts = [f for f in world.pretrain_facts]
    prompts, objects = zip(*(f.query() for f in facts), strict=True)
    info["pretrain_query_accuracy"] = accuracy(model, lm_examples(tokenizer, list(objects), list(prompts)))
    info["pretrain_mean_loss"] = float(example_losses(model, data).mean())
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    (path / "info.json").write_text(json.dumps(info))
    return model, tokenizer, world, info


# ---------------------------------------------------------------- LoRA fine-tuning


@dataclass(frozen=True)
class LoraRecipe:
    rank: int = 4
    alpha: float = 8.0
    targets: tuple[str, ...] = ("c_attn", "c_fc")
    epochs: int = 16
    lr: float = 0.01
    momentum: float = 0.9
    batch: int = 16
    checkpoints: int = 4  # kept at equal spacing in epochs (the last one is the final model)


@dataclass
class FineTuned:
    model: nn.Module
    checkpoints: list[TrajectoryCheckpoint] = field(default_factory=list)


def lora_model(base: nn.Module, recipe: LoraRecipe, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        target_modules=list(recipe.targets),
        fan_in_fan_out=True,
        lora_dropout=0.0,
    )
    return peft.get_peft_model(copy.deepcopy(base), config)


def finetune(
    base: nn.Module, data: Examples, recipe: LoraRecipe, seed: int, keep_checkpoints: bool = False
) -> FineTuned:
    """LoRA fine-tuning by minibatch SGD with momentum on the mean per-example loss (summed token NLL)."""
    model = lora_model(base, recipe, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum)
    generator = torch.Generator().manual_seed(10_000 + seed)
    keep_every = max(1, recipe.epochs // recipe.checkpoints)
    result = FineTuned(model)
    step = 0
    model.train()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(data), generator=generator)
        for first in range(0, len(data), recipe.batch):
            rows = order[first : first + recipe.batch]
            loss = _losses(model, data.inputs[rows], data.attention_mask[rows], data.targets[rows]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if keep_checkpoints and (epoch + 1) % keep_every == 0:
            snapshot = copy.deepcopy(model).eval()
            result.checkpoints.append(TrajectoryCheckpoint(snapshot, step, recipe.lr, recipe.momentum, 0))
    model.eval()
    return result


# ---------------------------------------------------------------- kronfluence (benchmark venv only)


class KronfluenceLM:
    """kronfluence 1.0.1 EK-FAC on the LoRA modules of a causal LM; measurement = the query's summed NLL of
    its scored tokens (the engine's ``loss``), so positive = helpful as in the engine."""

    def __init__(self, model: nn.Module, layers: list[str]):
        import logging

        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.task import Task
        from kronfluence.utils.dataset import DataLoaderKwargs

        logging.getLogger("kronfluence").setLevel(logging.ERROR)

        def nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            logits, labels = logits[:, :-1], labels[:, 1:]
            return F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )

        class LMTask(Task):
            def compute_train_loss(self, batch, model, sample=False):
                ids, mask, labels = batch
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                if not sample:
                    return nll(logits, labels)
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), dim=-1)
                    sampled = torch.multinomial(probs.view(-1, probs.shape[-1]), 1).view(labels.shape)
                    # sample the next token at every scored position (labels are aligned with the inputs)
                    sampled = torch.cat([labels[:, :1], sampled[:, :-1]], dim=1)
                    sampled = sampled.masked_fill(labels == -100, -100)
                return nll(logits, sampled)

            def compute_measurement(self, batch, model):
                ids, mask, labels = batch
                return nll(model(input_ids=ids, attention_mask=mask).logits.float(), labels)

            def get_influence_tracked_modules(self):
                return layers

            def get_attention_mask(self, batch):
                return batch[1]

        self.task = LMTask()
        self.model = prepare_model(copy.deepcopy(model).eval(), self.task)
        self._tmp = tempfile.TemporaryDirectory(prefix="kron-lm-")
        self.analyzer = Analyzer("lm", self.model, self.task, cpu=True, disable_tqdm=True, output_dir=self._tmp.name)
        self.analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))

    @staticmethod
    def dataset(examples: Examples) -> torch.utils.data.TensorDataset:
        assert examples.attention_mask is not None
        return torch.utils.data.TensorDataset(examples.inputs, examples.attention_mask, examples.targets)

    def pairwise(
        self,
        train: Examples,
        queries: Examples,
        batch_size: int = 64,
        empirical: bool = False,
        damping: float | None = None,
    ) -> torch.Tensor:
        from kronfluence.arguments import FactorArguments, ScoreArguments

        self.analyzer.fit_all_factors(
            "factors",
            self.dataset(train),
            per_device_batch_size=batch_size,
            factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=empirical),
            overwrite_output_dir=True,
        )
        self.analyzer.compute_pairwise_scores(
            "pairwise",
            "factors",
            self.dataset(queries),
            self.dataset(train),
            per_device_query_batch_size=len(queries),
            per_device_train_batch_size=batch_size,
            score_args=ScoreArguments(damping_factor=damping),
            overwrite_output_dir=True,
        )
        return self.analyzer.load_pairwise_scores("pairwise")["all_modules"].float()


# ---------------------------------------------------------------- BM25


def bm25(documents: list[str], queries: list[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """(Q, N) Okapi BM25 scores of lower-cased whitespace tokens (punctuation dropped)."""
    docs = [[w for w in d.lower().split() if w.isalnum()] for d in documents]
    counts = [Counter(d) for d in docs]
    frequency = Counter(w for d in docs for w in set(d))
    n, mean_length = len(docs), sum(len(d) for d in docs) / len(docs)
    idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in frequency.items()}
    out = np.zeros((len(queries), n))
    for q, query in enumerate(queries):
        words = [w for w in query.lower().split() if w.isalnum()]
        for i, (c, d) in enumerate(zip(counts, docs, strict=True)):
            norm = k1 * (1 - b + b * len(d) / mean_length)
            out[q, i] = sum(idf.get(w, 0.0) * c[w] * (k1 + 1) / (c[w] + norm) for w in words if w in c)
    return out


def pairwise_lm(top_k: int) -> dict[str, Any]:
    """The attribution arguments both LoRA benchmarks use: pairwise, the scored tokens' summed loss."""
    return {"loss": "causal_lm", "mode": "pairwise", "measurement": "loss", "top_k": top_k}


def our_methods(
    model: nn.Module, checkpoints: list[TrajectoryCheckpoint], train: Examples, queries: Examples, top_k: int
) -> dict[str, Callable[[], AttributionScores]]:
    """Our methods on a fine-tuned causal LM (pairwise, loss of the scored tokens), each with its defaults: the
    rows both LoRA benchmarks (fact tracing, LDS) compare, by label."""
    common = pairwise_lm(top_k)
    return {
        "EK-FAC influence (ours)": lambda: attribute(
            [model], train, queries, method="influence", options=InfluenceOptions(), **common
        ),
        "DataInf (ours)": lambda: attribute(
            [model], train, queries, method="datainf", options=DataInfOptions(), **common
        ),
        "gradient similarity, cosine (ours)": lambda: attribute(
            [model],
            train,
            queries,
            method="gradient_similarity",
            options=GradientSimilarityOptions(normalize=True),
            **common,
        ),
        "gradient dot product (ours)": lambda: attribute(
            [model], train, queries, method="gradient_similarity", options=GradientSimilarityOptions(), **common
        ),
        "TracInCP (ours)": lambda: attribute_tracin(checkpoints, train, queries, **common),
        "SOURCE (ours)": lambda: attribute_source(
            model, checkpoints, {0: train}, train, queries, options=SourceOptions(), **common
        ),
    }
