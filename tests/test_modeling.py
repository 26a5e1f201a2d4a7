"""The tiny model: built, saved and loaded back like any downloaded checkpoint; checkpoint checks."""

import json
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from lowrank_core.errors import CheckpointError
from lowrank_core.modeling import describe_checkpoint, load_model, load_processor


def test_tiny_model_round_trips_through_from_pretrained(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    model = load_model(tiny_model_dir).eval()
    again = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    assert isinstance(model, transformers.Qwen2_5_VLForConditionalGeneration)
    processor = load_processor(tiny_model_dir)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is this image real or tampered?"}]}],
        add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt",
                       images_kwargs={"size": {"shortest_edge": 64 * 64, "longest_edge": 64 * 64}})
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    assert image_tokens == 8 * 8  # the vision token grid of the default is 8x8 per image
    assert inputs["mm_token_type_ids"].sum().item() == image_tokens
    with torch.no_grad():
        logits = model(**inputs).logits
        assert torch.equal(logits, again(**inputs).logits)
    assert logits.shape[-1] == model.config.text_config.vocab_size
    assert "torchvision" not in sys.modules


def test_tokenizer_carries_the_qwen_chat_tokens(tiny_model_dir):
    tokenizer = load_processor(tiny_model_dir).tokenizer
    for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        assert len(tokenizer(token)["input_ids"]) == 1, token
    assert tokenizer.decode(tokenizer("The image is tampered.")["input_ids"]) == "The image is tampered."


def test_checkpoint_description(tiny_model_dir):
    info = describe_checkpoint(tiny_model_dir, "vision_language")
    assert info["model_type"] == "qwen2_5_vl" and info["weight_files"]["model.safetensors"] > 0
    with pytest.raises(CheckpointError, match="no vision_config, but model.modality is vision_language|"
                                              "has a vision_config, but model.modality is text"):
        describe_checkpoint(tiny_model_dir, "text")


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "model checkpoint directory does not exist"),
        (lambda d: d.mkdir(), r"config\.json: missing"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("{")), r"config\.json: not valid JSON"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("{}"), (d / "pytorch_model.bin").write_bytes(b"x")),
         r"no \*\.safetensors weights \(pickled \.bin checkpoints are not loaded\)"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("{}"), (d / "model-1.safetensors").write_bytes(b"x"),
                    (d / "model.safetensors.index.json").write_text(
                        '{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}')),
         r"names shard model-2\.safetensors, which is missing"),
    ],
)
def test_bad_checkpoints_are_refused(tmp_path, setup, message):
    checkpoint = tmp_path / "ckpt"
    setup(checkpoint)
    with pytest.raises(CheckpointError, match=message):
        describe_checkpoint(checkpoint, "text")


def test_the_pretrained_tiny_base_tells_grainy_from_clean_images(tiny_model_dir):
    """The tiny base's pre-training works: on fresh scenes it prefers 'grainy' for noisy and 'clean' for clean ones,
    scored by the answer's log-probability (an independent readout, not the pre-training loss)."""
    from sklearn.metrics import roc_auc_score

    from lowrank_core.data import scene
    from lowrank_core.lm_data import ChatBatcher
    from lowrank_core.modalities.vision_language import answer_logprobs
    from lowrank_core.pretrain import GRAIN_THRESHOLD, QUESTION, WORDS

    model, processor = load_model(tiny_model_dir).eval(), load_processor(tiny_model_dir)
    batcher = ChatBatcher(processor, QUESTION, WORDS[1], WORDS[0], 64)
    rng = np.random.default_rng(123)
    noise = [float(n) for n in rng.uniform(0, 2 * GRAIN_THRESHOLD, 32)]
    images = [Image.fromarray(scene(rng, 64, n)) for n in noise]
    scores = {}
    for label in (1, 0):
        batch = batcher([{"image": image, "label": label} for image in images])
        with torch.no_grad():
            scores[label] = answer_logprobs(model(**batch, use_cache=False).logits, batch["labels"])[0]
    grainy = [n > GRAIN_THRESHOLD for n in noise]
    assert roc_auc_score(grainy, (scores[1] - scores[0]).numpy()) > 0.9


def test_the_pretrained_tiny_base_encodes_each_tokens_grain_contrast(tiny_model_dir):
    """The vision step's contrast target is learned: a linear read-out fitted on the vision tokens of fresh scenes
    with a region at another noise level predicts each token's grain contrast on other such scenes (R² 0.35 on the
    AMD EPYC; 0.0 from the tokens of the base pre-trained without the contrast target, and of a read-out of nothing)."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score

    from lowrank_core.data import region_mask, scene
    from lowrank_core.pretrain import _token_statistics

    model, processor = load_model(tiny_model_dir).eval(), load_processor(tiny_model_dir)
    rng = np.random.default_rng(11)
    images = []
    for _ in range(32):
        inside = np.asarray(region_mask(rng, 64), dtype=bool)[..., None]
        noise = rng.normal(0, 1, (64, 64, 3)) * np.where(inside, *rng.uniform(2, 40, 2))
        images.append(np.clip(scene(rng, 64, 0.0) + noise, 0, 255).astype(np.uint8))
    inputs = processor.image_processor(images=[Image.fromarray(i) for i in images], return_tensors="pt",
                                       size={"shortest_edge": 64 * 64, "longest_edge": 64 * 64})
    with torch.no_grad():
        tokens = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                return_dict=True).pooler_output
    merge = processor.image_processor.patch_size * processor.image_processor.merge_size
    contrast = [_token_statistics(image, merge)[:, 4].numpy() for image in images]
    fit, held_out = slice(0, 24), slice(24, 32)
    readout = Ridge(alpha=1.0).fit(np.concatenate(tokens[fit]), np.concatenate(contrast[fit]))
    assert r2_score(np.concatenate(contrast[held_out]), readout.predict(np.concatenate(tokens[held_out]))) > 0.2


def test_the_pretrained_tiny_base_says_the_answer_words_but_cannot_tell_them_apart(tiny_model_dir):
    """The pre-training's answer-word step works: asked for an answer word, or asked the study's question, about a
    fresh scene, the base answers with one of the two (together they hold most of its probability; measured 0.99).
    And the answer words are whole tokens sharing one embedding and one output row, so the base gives both the same
    log-probability for every scene: it is blind to the study's question by construction."""
    from lowrank_core.data import scene
    from lowrank_core.lm_data import ChatBatcher
    from lowrank_core.modalities.vision_language import answer_logprobs
    from lowrank_core.pretrain import ANSWER_WORDS, WORD_QUESTION
    from lowrank_core.training import TrainConfig

    model, processor = load_model(tiny_model_dir).eval(), load_processor(tiny_model_dir)
    rng = np.random.default_rng(7)
    records = [{"image": Image.fromarray(scene(rng, 64, float(rng.uniform(0, 20)))), "label": 1} for _ in range(16)]
    for question in [WORD_QUESTION.format(word=asked) for asked in ANSWER_WORDS] + [TrainConfig().question]:
        logprobs = []
        for word in ANSWER_WORDS:
            batcher = ChatBatcher(processor, question, word, word, 64)
            assert len(batcher.answer_ids[1]) == 2, word  # the word, then the end of the turn
            batch = batcher(records)
            with torch.no_grad():
                logprobs.append(answer_logprobs(model(**batch, use_cache=False).logits, batch["labels"])[0])
        assert (logprobs[0].exp() + logprobs[1].exp() > 0.8).all(), question
        assert logprobs[0].std() > 0, question  # the scenes do reach the answer
        assert torch.equal(logprobs[0], logprobs[1]), question
