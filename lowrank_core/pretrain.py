"""Pre-training of the tiny base: what a real vision-language model knows before the study starts.

A real base has seen images and talked about them; a random one has not, and its full fine-tune only learns the
answer format (the answer-word prior) on a few hundred images. So the tiny model is given a short pre-training on
generic low-level vision and on saying words, never on tampering:

1. **vision**: the vision tower and merger learn to encode each merged token's mean colour, its local grain (the
   energy of the image minus its 3x3 blur) and that grain's contrast with the image's median token (how much grainier
   or cleaner than the rest of the image it is), through a linear read-out that is then thrown away. A vision
   encoder's features see local structure against its context; without the contrast, on data where the grain level
   says little (README, "The data"), the teacher reached test ROC-AUC 0.78 and the lm baseline 0.62-0.67, and with
   a language step about the grainiest and cleanest parts instead the teacher 0.84, the lm arms at the label-blind
   loss;
2. **language**: the whole model learns to answer "Is this image grainy or clean?" about scenes whose *global*
   sensor noise is low or high, so its language model has learned to read its vision tokens; every `WORD_EVERY`-th
   step instead asks it to say one of `ANSWER_WORDS` (the default answer words), named in the question, about a
   scene that has nothing to do with the word. It learns to answer with one of the two, each half the time, for
   every scene (not which one was asked for): like a real base, it can say them, but has never tied them to what
   it sees;
3. **whole answer words**: the answer words become whole tokens of the tokenizer that share one input embedding and
   one output row, fitted on the answer-word step with the rest of the model frozen. The base says either word, and
   gives both the same probability for every image: blind to the study's question by construction, whatever the CPU
   (spelled in pieces, the words' rows took up the grain the base reads with a sign and weight that rounding in the
   CPU's kernels decided, test ROC-AUC 0.41 on one machine and 0.14 on another). The study's fine-tunes start from
   that tie and break it.

The tamper question is never seen: grain contrast is a property of every token of every image, read out per token,
never asked about, and the language step's question reads the grain level, which the study's data makes useless for
the tamper answer. The answer words never answer a question about an image: the study's fine-tunes have to learn
which word an image gets, and from which tokens.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .data import region_mask, scene
from .lm_data import ChatBatcher
from .modeling import whole_answer_words
from .training import TrainConfig

log = logging.getLogger(__name__)

QUESTION = "Is this image grainy or clean? Answer with one word."
WORDS = {1: "grainy", 0: "clean"}
GRAIN_THRESHOLD = 10.0  # sensor-noise std (of 255) above which a scene is "grainy"
WORD_QUESTION = 'Answer with the word "{word}".'
ANSWER_WORDS = (TrainConfig.negative_word, TrainConfig.positive_word)  # the default answer words
WORD_EVERY = 4  # every 3rd step: the base at 0.51, the teacher at 0.89 test ROC-AUC; every 4th: 0.41 and 0.93
WHOLE_WORD_STEPS = 40  # the answer-word loss then 0.351 per token (a fair coin between the two: 0.347)
WHOLE_WORD_LR = 1e-2
VISION_BATCH_SIZE = 16
LANGUAGE_BATCH_SIZE = 8
WARMUP_STEPS = 10


def pretrain_tiny(model: torch.nn.Module, processor, image_size: int, vision_steps: int, language_steps: int,
                  lr: float, seed: int) -> dict:
    """Pre-train `model` in place (vision read-out, the grain question and the answer words, the whole answer words);
    returns the last losses of each."""
    rng = np.random.default_rng([seed, 1])
    losses = {"vision": _pretrain_vision(model, processor, image_size, vision_steps, lr, rng),
              "language": math.nan, "answer_words": math.nan}
    grain = ChatBatcher(processor, QUESTION, WORDS[1], WORDS[0], image_size)
    say = [ChatBatcher(processor, WORD_QUESTION.format(word=word), word, word, image_size) for word in ANSWER_WORDS]
    optimizer, schedule = warmup_cosine_adamw(model.parameters(), lr, language_steps)
    model.train()
    for step in tqdm(range(language_steps), desc="pretrain language", unit="step"):
        if step % WORD_EVERY == WORD_EVERY - 1:
            loss = _answer_word_loss(model, say, rng, image_size)
            losses["answer_words"] = loss.item()
        else:
            loss = model(**grain(_scenes(rng, image_size, LANGUAGE_BATCH_SIZE)), use_cache=False).loss
            losses["language"] = loss.item()
        optimizer_step(loss, model.parameters(), optimizer, schedule)
    losses["whole_answer_words"] = _learn_whole_answer_words(model, processor, rng, image_size, say,
                                                             WHOLE_WORD_STEPS if language_steps else 0)
    model.eval()
    log.info("pre-trained the tiny base: vision read-out loss %.3f, grain-question loss %.3f, answer-word loss %.3f, "
             "whole answer-word loss %.3f", losses["vision"], losses["language"], losses["answer_words"],
             losses["whole_answer_words"])
    return losses


def _learn_whole_answer_words(model: torch.nn.Module, processor, rng: np.random.Generator, image_size: int,
                              say: list[ChatBatcher], steps: int) -> float:
    """Make the answer words whole tokens that share one input embedding and one output row (started from their
    first pieces'), fit that pair for `steps` answer-word steps with the rest of the model frozen; returns the last
    loss (NaN without steps)."""
    ids = whole_answer_words(processor.tokenizer)
    spellings = [batcher.answer_ids[1][0] for batcher in say]  # each word's first piece
    model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    rows = []
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        # resizing swaps the data under the old parameter, whose gradient accumulator keeps the old shape
        module.weight = torch.nn.Parameter(module.weight.detach().clone())
        rows.append(module.weight)
    with torch.no_grad():
        for weight in rows:
            weight[ids] = weight[spellings].mean(dim=0)
    say = [ChatBatcher(processor, batcher.question, batcher.positive_word, batcher.negative_word, image_size)
           for batcher in say]  # the words now tokenize whole
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    for weight in rows:
        weight.requires_grad_(True)
    optimizer = torch.optim.Adam(rows, lr=WHOLE_WORD_LR)
    loss = torch.tensor(math.nan)
    for _ in tqdm(range(steps), desc="pretrain whole answer words", unit="step"):
        loss = _answer_word_loss(model, say, rng, image_size)
        optimizer.zero_grad()
        loss.backward()
        for weight in rows:  # only the answer words' rows move, by their mean gradient: they stay equal
            shared = weight.grad[ids].mean(dim=0)
            weight.grad.zero_()
            weight.grad[ids] = shared
        optimizer.step()
    for parameter in trainable:
        parameter.requires_grad_(True)
    return loss.item()


def _answer_word_loss(model: torch.nn.Module, say: list[ChatBatcher], rng: np.random.Generator,
                      image_size: int) -> torch.Tensor:
    """The answer-word step's loss: half the batch asked for each word (label 1: the word asked for), about scenes."""
    return sum(model(**batcher(_scenes(rng, image_size, LANGUAGE_BATCH_SIZE // len(say), label=1)),
                     use_cache=False).loss / len(say) for batcher in say)


def _scenes(rng: np.random.Generator, size: int, count: int, label: int | None = None) -> list[dict]:
    """`count` records of scenes at random sensor noise, labelled `label`, or without one grainy (1) or clean (0) by
    their noise."""
    records = []
    for _ in range(count):
        noise = float(rng.uniform(0, 2 * GRAIN_THRESHOLD))
        records.append({"image": Image.fromarray(scene(rng, size, noise)),
                        "label": int(noise > GRAIN_THRESHOLD) if label is None else label})
    return records


def _pretrain_vision(model: torch.nn.Module, processor, image_size: int, steps: int, lr: float,
                     rng: np.random.Generator) -> float:
    """Train the vision tower + merger to linearly encode every merged token's colour, grain and grain contrast
    (`_token_statistics`), at a constant lr (with warm-up and decay the features it leaves were too weak for the
    language step to pick up)."""
    visual = model.model.visual
    merge = processor.image_processor.patch_size * processor.image_processor.merge_size
    readout = torch.nn.Linear(model.config.text_config.hidden_size, 5)  # RGB, log grain, grain contrast
    optimizer = torch.optim.AdamW([*visual.parameters(), *readout.parameters()], lr=lr)
    pixels = image_size * image_size
    loss = torch.zeros(())
    for _ in tqdm(range(steps), desc="pretrain vision", unit="step"):
        images = [_grainy_patches(rng, image_size) for _ in range(VISION_BATCH_SIZE)]
        inputs = processor.image_processor(images=[Image.fromarray(i) for i in images], return_tensors="pt",
                                           size={"shortest_edge": pixels, "longest_edge": pixels})
        tokens = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                return_dict=True).pooler_output
        targets = torch.stack([_token_statistics(image, merge) for image in images])
        loss = F.mse_loss(readout(torch.stack(list(tokens))), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def warmup_cosine_adamw(parameters, lr: float, steps: int):
    """The tiny bases' pre-training optimizer: AdamW with a 10-step warm-up and cosine decay over `steps` (without the
    warm-up the grain question is not learned); (optimizer, schedule)."""
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, min(WARMUP_STEPS, steps), max(steps, 1))


def optimizer_step(loss: torch.Tensor, parameters, optimizer, schedule) -> None:
    """One pre-training step on `loss`: gradients clipped to norm 1, then the optimizer and the schedule step."""
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    schedule.step()


def _grainy_patches(rng: np.random.Generator, size: int) -> np.ndarray:
    """A scene with up to two regions of extra sensor noise: grain that varies over the image."""
    image = scene(rng, size, float(rng.uniform(0, 8))).astype(np.float32)
    for _ in range(rng.integers(0, 3)):
        inside = np.asarray(region_mask(rng, size), dtype=bool)[..., None]
        image = np.where(inside, image + rng.normal(0, rng.uniform(5, 30), image.shape), image)
    return np.clip(image, 0, 255).astype(np.uint8)


def _token_statistics(image: np.ndarray, cell: int) -> torch.Tensor:
    """Per `cell` x `cell` block (one merged vision token, row-major): mean RGB and log grain, scaled to ~unit range,
    and the grain's contrast (its log grain minus the image's median token's)."""
    pixels = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None] / 255
    blurred = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    grain = (pixels - blurred).square().mean(dim=1, keepdim=True)
    colour = F.avg_pool2d(pixels, cell)[0] * 4 - 2
    log_grain = (torch.log(F.avg_pool2d(grain, cell)[0] + 1e-5) + 7) / 2
    contrast = log_grain - log_grain.flatten().median()
    return torch.cat([colour, log_grain, contrast]).flatten(1).T
