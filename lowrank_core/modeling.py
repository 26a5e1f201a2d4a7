"""Base models: build the tiny default, describe a local checkpoint, and load either the same way.

The tiny model (`model.tiny.arch`) is a real `Qwen2_5_VLForConditionalGeneration` or
`Qwen3VLForConditionalGeneration` (with DeepStack mergers) with random weights, a byte-level BPE tokenizer trained
locally that carries the Qwen chat special tokens, a PIL image processor and that architecture's chat template, all
written with `save_pretrained`. Everything downstream loads it with `from_pretrained`, exactly like a downloaded
Qwen2.5-VL / Qwen3-VL / Qwen2.5 checkpoint. Nothing here touches a model hub.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from functools import cache
from pathlib import Path
from typing import Literal

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import Section, require
from .errors import CheckpointError
from .io import atomic_path
from .modalities.depth.models import TinyDepthSpec
from .modalities.instruct.tiny import TinyTextSpec

log = logging.getLogger(__name__)

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)

# The Qwen-VL chat template (images and videos become pad tokens the processor expands). Qwen2-VL / Qwen2.5-VL open
# with a default system turn where the chat has none; Qwen3-VL does not.
_CHAT_START = ("{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
               "{% for message in messages %}")
_DEFAULT_SYSTEM = ("{% if loop.first and message['role'] != 'system' %}"
                   "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}")
_CHAT_TURNS = (
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_TEMPLATES = {"qwen2_5_vl": _CHAT_START + _DEFAULT_SYSTEM + _CHAT_TURNS, "qwen3_vl": _CHAT_START + _CHAT_TURNS}

# What the tokenizer of the tiny model is trained on: the prompts and answers the workflow uses, plus filler.
TOKENIZER_CORPUS = (
    "You are a helpful assistant.",
    "Is this image real or tampered? Answer with one word.",
    "Where is the tampered region? The image is real. The image is tampered.",
    "Yes No real tampered fake authentic spliced copied moved region top bottom left right centre",
    "A vision-language model reads an image and answers a question about it in a few words.",
)


@dataclasses.dataclass(frozen=True)
class TinyArch:
    """The transformers classes of a tiny architecture."""

    model: str
    config: str
    processor: str


TINY_ARCHS = {
    "qwen2_5_vl": TinyArch("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", "Qwen2_5_VLProcessor"),
    "qwen3_vl": TinyArch("Qwen3VLForConditionalGeneration", "Qwen3VLConfig", "Qwen3VLProcessor"),
}


@dataclasses.dataclass(frozen=True)
class TinyModelSpec(Section):
    """Architecture and sizes of the tiny vision-language model (the embedded default's: a Qwen2.5-VL), and its
    pre-training."""

    key = "model.tiny"
    arch: str = "qwen2_5_vl"  # a key of TINY_ARCHS
    seed: int = 0
    patch_size: int = 4
    vision_depth: int = 4
    vision_hidden_size: int = 64
    vision_heads: int = 2
    text_hidden_size: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    vocab_size: int = 512
    pretrain_vision_steps: int = 300
    pretrain_language_steps: int = 300
    pretrain_lr: float = 2e-3
    image_size: int = 64

    def check(self, key: str) -> None:
        require(self.arch in TINY_ARCHS, key, "arch", f"{self.arch!r} is not one of {', '.join(TINY_ARCHS)}")
        for name in ("patch_size", "vision_depth", "vision_hidden_size", "vision_heads", "text_hidden_size",
                     "text_layers", "text_heads", "text_kv_heads"):
            require(getattr(self, name) >= 1, key, name, "must be at least 1")
        require(self.vision_hidden_size % self.vision_heads == 0, key, "vision_hidden_size",
                "must be divisible by vision_heads")
        require(self.text_hidden_size % self.text_heads == 0, key, "text_hidden_size",
                "must be divisible by text_heads")
        require(self.text_heads % self.text_kv_heads == 0, key, "text_kv_heads", "must divide text_heads")
        require((self.text_hidden_size // self.text_heads) % 8 == 0, key, "text_hidden_size",
                "head dimension (text_hidden_size / text_heads) must be a multiple of 8 for multimodal RoPE")
        require(self.vocab_size >= 300, key, "vocab_size", "must be at least 300 (256 bytes + special tokens)")
        for name in ("pretrain_vision_steps", "pretrain_language_steps"):
            require(getattr(self, name) >= 0, key, name, "must not be negative (0 skips that pre-training)")
        require(self.pretrain_lr > 0, key, "pretrain_lr", "must be positive")
        require(self.image_size % (2 * self.patch_size) == 0, key, "image_size",
                "must be a multiple of 2 * patch_size (whole merged vision tokens)")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    """Which base model the study starts from: `tiny`, or the path of a local checkpoint directory."""

    key = "model"
    source: str = "tiny"
    modality: Literal["vision_language", "text", "instruct", "depth"] = "vision_language"
    backend: Literal["transformers", "vggt"] = "transformers"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    tiny: TinyModelSpec = TinyModelSpec()
    tiny_depth: TinyDepthSpec = TinyDepthSpec()  # the depth modality's
    tiny_text: TinyTextSpec = TinyTextSpec()  # the instruct modality's

    def check(self, key: str) -> None:
        from .modalities import INFO

        info = INFO[self.modality]
        require(self.source == "tiny" or self.source.strip() != "", key, "source", "must be 'tiny' or a directory")
        require(self.source != "tiny" or info.tiny is not None, key, "source",
                f"there is no tiny {self.modality} model: point model.source at a local checkpoint")
        require(self.backend in info.strategies, key, "backend",
                f"model.modality {self.modality} models load with {' or '.join(info.strategies)}")
        require(self.source != "tiny" or self.backend == "transformers", key, "source",
                "the tiny model is a transformers model; a vggt backend needs a local checkpoint")


def build_tiny_model(out_dir: str | Path, spec: TinyModelSpec) -> Path:
    """Build the tiny `spec.arch` model (model, tokenizer, image processor, chat template) into `out_dir`,
    pre-trained on generic low-level vision (`pretrain.pretrain_tiny`) so that, like a real base, it can see its
    images.

    Both architectures normalise pixels with the Qwen2-VL image processor's CLIP mean / std. Real Qwen3-VL
    checkpoints use 0.5 / 0.5, but a tiny Qwen3-VL pre-trained with those (which halve the grain in input units) did
    not learn the grain question (final loss 0.124, its label-blind level, against 0.103), and in the workflow
    (config/examples/qwen3_vl_tiny.yaml) its base and teacher reached test ROC-AUC 0.52 and 0.77 against 0.78 and 0.92.
    """
    arch = TINY_ARCHS[spec.arch]
    torch.manual_seed(spec.seed)
    tokenizer = _train_tokenizer(spec.vocab_size)
    model = getattr(transformers, arch.model)(tiny_config(spec, tokenizer))
    image_processor = transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil(
        patch_size=spec.patch_size, merge_size=2, temporal_patch_size=2)
    processor = image_only_processor_class(getattr(transformers, arch.processor))(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATES[spec.arch])
    from .pretrain import pretrain_tiny  # here, not at the top: it imports PEFT (2 s) for every job that loads models

    pretrain_tiny(model, processor, spec.image_size, spec.pretrain_vision_steps, spec.pretrain_language_steps,
                  spec.pretrain_lr, spec.seed)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    log.info("built tiny %s with %d parameters in %s", arch.model, model.num_parameters(), out_dir)
    return Path(out_dir)


def tiny_config(spec: TinyModelSpec, tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.PretrainedConfig:
    """The tiny model's config (`spec.arch`): `spec`'s sizes, `tokenizer`'s vocabulary and special tokens.

    Both architectures share the sizes; each keeps its own layout at them. Qwen2.5-VL: windowed vision attention
    with every other block global, M-RoPE sections t/h/w 1/4, 3/8, 3/8 of the rotary half (as the 7B's 16/24/24).
    Qwen3-VL: learned vision position embeddings on the pre-training image's patch grid, DeepStack mergers after
    the blocks at 1/4, 1/2 and 3/4 of the depth (as the 2B's 5/11/17 of 24), interleaved M-RoPE with sections
    t/h/w 3/8, 5/16, 5/16 (as its 24/20/20), and an explicit head dimension.
    """
    token_id = tokenizer.convert_tokens_to_ids
    half_head_dim = spec.text_hidden_size // spec.text_heads // 2
    vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden_size,
                  intermediate_size=2 * spec.vision_hidden_size, num_heads=spec.vision_heads,
                  patch_size=spec.patch_size, spatial_merge_size=2, temporal_patch_size=2,
                  out_hidden_size=spec.text_hidden_size)
    text = dict(vocab_size=len(tokenizer), hidden_size=spec.text_hidden_size,
                intermediate_size=2 * spec.text_hidden_size, num_hidden_layers=spec.text_layers,
                num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads,
                max_position_embeddings=2048, bos_token_id=token_id("<|endoftext|>"),
                eos_token_id=token_id("<|im_end|>"), pad_token_id=token_id("<|endoftext|>"))
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if spec.arch == "qwen3_vl":
        spatial = half_head_dim * 5 // 16
        vision |= dict(num_position_embeddings=(spec.image_size // spec.patch_size) ** 2,
                       deepstack_visual_indexes=sorted({max(0, spec.vision_depth * k // 4 - 1) for k in (1, 2, 3)}))
        text |= dict(head_dim=2 * half_head_dim, rope_parameters={
            **rope, "mrope_section": [half_head_dim - 2 * spatial, spatial, spatial], "mrope_interleaved": True})
    else:
        temporal = half_head_dim // 4
        spatial = (half_head_dim - temporal) // 2
        vision |= dict(window_size=4 * spec.patch_size, fullatt_block_indexes=list(range(1, spec.vision_depth, 2)))
        text |= dict(rope_parameters={**rope, "mrope_section": [temporal, spatial, half_head_dim - temporal - spatial]})
    return getattr(transformers, TINY_ARCHS[spec.arch].config)(
        vision_config=vision, text_config=text,
        image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=False,  # as Qwen2.5-VL-7B: lm_head can take an adapter that merges cleanly
    )


def model_skeleton(cfg: ModelConfig) -> torch.nn.Module:
    """The base model's module tree on the meta device, from its config alone (no weights read, no pre-training):
    what the workflow checks its config against before any job runs. CheckpointError names an unusable
    checkpoint."""
    if cfg.source == "tiny":
        tokenizer = _train_tokenizer(cfg.tiny.vocab_size)
        whole_answer_words(tokenizer)
        config = tiny_config(cfg.tiny, tokenizer)
    else:
        read_model_config(cfg.source)
        config = transformers.AutoConfig.from_pretrained(cfg.source, trust_remote_code=cfg.trust_remote_code)
    auto = (transformers.AutoModelForImageTextToText if hasattr(config, "vision_config")
            else transformers.AutoModelForCausalLM)
    try:
        with torch.device("meta"):
            return auto.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{cfg.source}/config.json: cannot build its model ({str(err).splitlines()[0]})") from err


def _train_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `TOKENIZER_CORPUS` that carries the Qwen special tokens."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(vocab_size, TOKENIZER_CORPUS * 4, SPECIAL_TOKENS), eos_token="<|im_end|>",
        pad_token="<|endoftext|>", padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
    )


def whole_answer_words(tokenizer: transformers.PreTrainedTokenizerBase) -> list[int]:
    """Add the default answer words (`TrainConfig`'s negative and positive word) to `tokenizer` as whole tokens; their
    ids, in that order."""
    from .training import TrainConfig  # here, not at the top: accelerate takes 0.4 s to import

    words = [TrainConfig.negative_word, TrainConfig.positive_word]
    tokenizer.add_tokens(words)
    return tokenizer.convert_tokens_to_ids(words)


def train_bpe(vocab_size: int, corpus: list[str], special_tokens, split_digits: bool = False) -> Tokenizer:
    """A byte-level BPE tokenizer model trained on `corpus` with `special_tokens` (digits one per token, as Qwen2's,
    with `split_digits`)."""
    bpe = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    return bpe


@cache
def image_only_processor_class(base: type) -> type:
    """A subclass of a Qwen-VL processor class that needs no video processor (which would need torchvision).

    It keeps the base class's name, so the saved `processor_config.json` stays loadable by `AutoProcessor`
    wherever torchvision is installed.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})


def read_model_config(path: str | Path) -> dict:
    """The checkpoint's `config.json`; CheckpointError if the directory is not a transformers checkpoint."""
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: model checkpoint directory does not exist")
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing (not a transformers checkpoint directory)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err.msg} at line {err.lineno})") from err


def describe_checkpoint(path: str | Path, modality: str) -> dict:
    """Check a local checkpoint directory and summarise it (architecture, sizes, weight files).

    Only safetensors weights are accepted (no pickle); the config must be a model of `modality` (a vision-language
    one has a `vision_config`, a text one has none, ...).
    """
    from .modalities import get_modality

    path = Path(path).resolve()
    config = read_model_config(path)
    weights = sorted(p.name for p in path.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{path}: no *.safetensors weights (pickled .bin checkpoints are not loaded)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        missing = sorted(set(json.loads(index.read_text())["weight_map"].values()) - set(weights))
        if missing:
            raise CheckpointError(f"{index}: names shard {missing[0]}, which is missing")
    get_modality(modality).check_checkpoint(config, path / "config.json")
    text_config = config.get("text_config", config)
    return {
        "path": str(path),
        "modality": modality,
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures", []),
        "text_hidden_size": text_config.get("hidden_size"),
        "text_layers": text_config.get("num_hidden_layers"),
        "vision_hidden_size": config.get("vision_config", {}).get("out_hidden_size")
        or config.get("vision_config", {}).get("hidden_size"),
        "weight_files": {name: (path / name).stat().st_size for name in weights},
    }


def load_processor(path: str | Path, trust_remote_code: bool = False):
    """The checkpoint's processor (vision-language, without video processor) or tokenizer (text-only)."""
    config = read_model_config(path)
    if "vision_config" not in config:
        return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    processor_config = Path(path) / "processor_config.json"
    name = json.loads(processor_config.read_text()).get("processor_class") if processor_config.is_file() else None
    name = name or _PROCESSOR_BY_MODEL_TYPE.get(config.get("model_type"))
    base = getattr(transformers, name or "", None)
    if base is None:
        raise CheckpointError(f"{path}: cannot tell which processor class serves model_type "
                              f"{config.get('model_type')!r}")
    return image_only_processor_class(base).from_pretrained(path, trust_remote_code=trust_remote_code)


_PROCESSOR_BY_MODEL_TYPE = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "qwen3_vl_moe": "Qwen3VLProcessor",
}


def load_model(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False) -> torch.nn.Module:
    """Load a vision-language (image-text-to-text) or causal LM checkpoint with `from_pretrained`."""
    config = read_model_config(path)
    auto = (transformers.AutoModelForImageTextToText if "vision_config" in config
            else transformers.AutoModelForCausalLM)
    try:
        return auto.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be loaded ({str(err).splitlines()[0]})") from err


def prepare_model(cfg: ModelConfig, tiny_dir: str | Path | None, out_json: str | Path) -> dict:
    """Describe the base model (the built tiny one, or the local checkpoint `cfg.source`) into `out_json`."""
    from .io import write_json

    path = tiny_dir if cfg.source == "tiny" else cfg.source
    info = {**describe_checkpoint(path, cfg.modality), "source": cfg.source, "backend": cfg.backend,
            "dtype": cfg.dtype, "trust_remote_code": cfg.trust_remote_code}
    write_json(out_json, info)
    log.info("base model %s (%s)", info["path"], info["model_type"])
    return info
