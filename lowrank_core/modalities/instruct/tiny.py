"""The tiny text base of the instruction-tuning study: a `Qwen2ForCausalLM` that knows arithmetic, not the task.

A real base (e.g. a math-pretrained LM) has seen plenty of arithmetic, also about things, but not the study's
chat-formatted word problems, so its fine-tune teaches the task format and which operation each question asks for,
not arithmetic from nothing. The tiny base is built the same way: random init, then a short, seeded pre-training on
facts of the four word-problem operations over the synthetic data's operands 1 .. `max_number`, one per line, several
to a document, each written as an equation ("3 + 4 = 7", "2 + 3 - 1 = 4") or as a sentence about the problems' items
("5 groups of 2 books are 10 books"). It never sees a chat turn, a name or a question: it answers none of the test
word problems (it continues with an equation) until it is fine-tuned. Pre-trained on equations
alone (one seed, a 800-step teacher at test exact match 0.95, 1.0 with the sentences), an svd-init LoRA student on all
layers reached 0.70 after 150 steps, against 0.95 with the sentences.

The byte-level BPE tokenizer (digits split one per token, as Qwen2's) is trained locally on such facts and on the word
problems' vocabulary, carries the Qwen2.5 text special tokens and chat template (a default system turn
where the chat has none). Everything is written with `save_pretrained` and loads with `AutoModelForCausalLM` /
`AutoTokenizer`, like a downloaded Qwen2.5 checkpoint. Nothing here touches a model hub.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from ...config import Section, require
from ...io import atomic_path
from .synthetic import INSTRUCTION, ITEMS, SYSTEM_PROMPT, word_problem

log = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # a Qwen2.5 text model's
FACTS_PER_DOCUMENT = 8
PRETRAIN_BATCH_SIZE = 8


@dataclasses.dataclass(frozen=True)
class TinyTextSpec(Section):
    """Sizes of the tiny text base (a Qwen2.5-style decoder) and its arithmetic pre-training; `max_number` is the
    largest operand, as the synthetic data's (`dataset.synthetic_instructions.max_number`)."""

    key = "model.tiny_text"
    seed: int = 0
    vocab_size: int = 512
    hidden_size: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 128
    pretrain_steps: int = 700  # batches of number facts; 0 leaves the weights random
    pretrain_lr: float = 3e-3
    max_number: int = 5

    def check(self, key: str) -> None:
        for name in ("hidden_size", "layers", "heads", "kv_heads", "intermediate_size"):
            require(getattr(self, name) >= 1, key, name, "must be at least 1")
        require(self.hidden_size % self.heads == 0, key, "hidden_size", "must be divisible by heads")
        require(self.heads % self.kv_heads == 0, key, "kv_heads", "must divide heads")
        require((self.hidden_size // self.heads) % 2 == 0, key, "hidden_size",
                "head dimension (hidden_size / heads) must be even for RoPE")
        require(self.vocab_size >= 300, key, "vocab_size", "must be at least 300 (256 bytes + special tokens)")
        require(self.pretrain_steps >= 0, key, "pretrain_steps", "must not be negative (0 skips pre-training)")
        require(self.pretrain_lr > 0, key, "pretrain_lr", "must be positive")
        require(2 <= self.max_number <= 99, key, "max_number", "must be in [2, 99]")


def build_tiny_text_model(out_dir: str | Path, spec: TinyTextSpec) -> Path:
    """Build the tiny text base (model, tokenizer, chat template) into `out_dir`, pre-trained on number facts."""
    torch.manual_seed(spec.seed)
    tokenizer = tiny_text_tokenizer(spec)
    model = transformers.Qwen2ForCausalLM(tiny_text_config(spec, tokenizer))
    loss = pretrain_arithmetic(model, tokenizer, spec)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.info("built tiny Qwen2ForCausalLM with %d parameters in %s (number-fact loss %.3f)", model.num_parameters(),
             out_dir, loss)
    return Path(out_dir)


def tiny_text_skeleton(spec: TinyTextSpec) -> torch.nn.Module:
    """The tiny text base's module tree on the meta device (no pre-training): what start-up checks read."""
    with torch.device("meta"):
        return transformers.Qwen2ForCausalLM(tiny_text_config(spec, tiny_text_tokenizer(spec)))


def tiny_text_tokenizer(spec: TinyTextSpec) -> transformers.PreTrainedTokenizerFast:
    """The tokenizer trained on number facts, word problems (their vocabulary) and the chat's fixed strings."""
    rng = np.random.default_rng([spec.seed, 2])
    facts = [number_fact(rng, spec.max_number) for _ in range(512)]
    problems = [word_problem(rng, spec.max_number, False)[0] for _ in range(64)]
    chat = ["system", "user", "assistant", "You are a helpful assistant.", SYSTEM_PROMPT, INSTRUCTION]
    return train_tokenizer(spec.vocab_size, [*facts, *problems, *chat * 16])


def tiny_text_config(spec: TinyTextSpec, tokenizer: transformers.PreTrainedTokenizerFast) -> transformers.Qwen2Config:
    token_id = tokenizer.convert_tokens_to_ids
    return transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=1024, bos_token_id=token_id("<|endoftext|>"), eos_token_id=token_id("<|im_end|>"),
        pad_token_id=token_id("<|endoftext|>"), tie_word_embeddings=False)  # lm_head can take its own adapter


def number_fact(rng: np.random.Generator, max_number: int) -> str:
    """A random fact of one of the four word-problem operations (operands 1 .. `max_number`, result >= 0), as an
    equation ("3 + 4 = 7") or, half the time, a sentence about items ("3 apples and 4 more apples are 7 apples")."""
    a, b, c = (int(x) for x in rng.integers(1, max_number + 1, size=3))
    item = ITEMS[rng.integers(len(ITEMS))]
    kind = int(rng.integers(4))
    if kind == 1:
        a, b = max(a, b), min(a, b)
    c = min(c, a + b)
    equation, sentence = [(f"{a} + {b} = {a + b}", f"{a} {item} and {b} more {item} are {a + b} {item}."),
                          (f"{a} - {b} = {a - b}", f"{a} {item} take away {b} {item} leaves {a - b} {item}."),
                          (f"{a} * {b} = {a * b}", f"{a} groups of {b} {item} are {a * b} {item}."),
                          (f"{a} + {b} - {c} = {a + b - c}",
                           f"{a} {item} and {b} more, take away {c}, leaves {a + b - c} {item}.")][kind]
    return sentence if rng.random() < 0.5 else equation


def train_tokenizer(vocab_size: int, corpus: list[str]) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus`, digits one per token, with the Qwen special tokens and the
    text chat template."""
    from ...modeling import train_bpe  # here: `modeling` imports this module

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(vocab_size, corpus, SPECIAL_TOKENS, split_digits=True), eos_token="<|im_end|>",
        pad_token="<|endoftext|>", padding_side="left", chat_template=CHAT_TEMPLATE)


def pretrain_arithmetic(model: transformers.PreTrainedModel, tokenizer, spec: TinyTextSpec) -> float:
    """Train `model` in place as a causal LM on documents of random `number_fact`s, one per line (AdamW, warm-up,
    cosine decay); returns the last batch's loss."""
    from ...pretrain import optimizer_step, warmup_cosine_adamw  # here: `modeling` imports this module

    rng = np.random.default_rng([spec.seed, 1])
    optimizer, schedule = warmup_cosine_adamw(model.parameters(), spec.pretrain_lr, spec.pretrain_steps)
    model.train()
    loss = torch.full((), float("nan"))
    for _ in tqdm(range(spec.pretrain_steps), desc="pretrain text", unit="step"):
        documents = ["\n".join(number_fact(rng, spec.max_number) for _ in range(FACTS_PER_DOCUMENT))
                     for _ in range(PRETRAIN_BATCH_SIZE)]
        batch = tokenizer(documents, padding=True, padding_side="right", return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels, use_cache=False).loss
        optimizer_step(loss, model.parameters(), optimizer, schedule)
    model.eval()
    return loss.item()
