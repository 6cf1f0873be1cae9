"""DreamBooth data (Ruiz et al., 2023) as the paper's subject-driven generation experiment (Fig. 2) uses it: a
subject's photos, the dataset's ``prompts_and_classes.txt`` (class per subject, object and live-subject prompt
lists), the instance prompt, the evaluation prompts, and SDXL's image preprocessing with its micro-conditioning
inputs (original size, crop top-left, target size). No model is touched here, so every input error surfaces as a
:class:`ConfigError` before anything expensive loads.

Prompt styles:

* ``official`` (default): what the official code ran. Training prompt "a photo of <subject folder name>"
  (train_lily.sh, no rare token); evaluation prompts "A picture of a <subject folder name> <context>" over the 25
  object contexts, for every subject (infer_lily.py has this one list).
* ``rare_token``: the DreamBooth paper's form, "a <token> <class>" for training and the dataset's lists
  ('a {0} {1} in the jungle'.format(token, class)), the live-subject list for dogs and cats.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

from typing import Any, Optional

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lilyexp.errors import ConfigError
from lilyexp.settings import knob
from lilyexp.tasks import TaskSettings

PROMPT_STYLES = ("official", "rare_token")
CLIP_TEXTS = ("class", "prompt")  # what CLIP-T compares an image with (evaluation_prompts' class_noun)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LIVE_CLASSES = ("dog", "cat")  # the dataset's live subjects are its dogs and cats; the rest are objects
TABLE_FILE = "prompts_and_classes.txt"
_TEMPLATE = re.compile(r"""^\s*(['"].*['"])\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?\s*$""")


@dataclass(frozen=True)
class PromptTable:
    """The contents of ``prompts_and_classes.txt``: subject -> class, and the two prompt-template lists (Python
    format strings with ``{0}`` the unique token and ``{1}`` the class)."""

    classes: dict[str, str]
    object_templates: list[str]
    live_templates: list[str]
    source: str = ""

    def class_of(self, subject: str) -> str:
        if subject not in self.classes:
            raise ConfigError(f"subject '{subject}' is not in the class table {self.source} "
                              f"(known: {', '.join(sorted(self.classes))}).")
        return self.classes[subject]

    def is_live(self, subject: str) -> bool:
        return self.class_of(subject) in LIVE_CLASSES

    def templates(self, subject: str) -> list[str]:
        return self.live_templates if self.is_live(subject) else self.object_templates


def _section_templates(lines: list[str], heading: str, source: str) -> list[str]:
    """The ``prompt_list = [...]`` entries after ``heading``, read as string literals (never executed)."""
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == heading)
    except StopIteration:
        raise ConfigError(f"{source} has no '{heading}' section.") from None
    templates = []
    for line in lines[start + 1:]:
        if line.strip() == "]":
            break
        match = _TEMPLATE.match(line)
        if match:
            templates.append(ast.literal_eval(match.group(1)))
    if not templates:
        raise ConfigError(f"{source} lists no prompts under '{heading}'.")
    return templates


def _class_table(lines: list[str], source: str) -> dict[str, str]:
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "subject_name,class")
    except StopIteration:
        raise ConfigError(f"{source} has no 'subject_name,class' table.") from None
    classes = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        subject, _, class_name = line.strip().partition(",")
        classes[subject.strip()] = class_name.strip()
    return classes


def read_prompt_table(path: str | Path) -> PromptTable:
    """Parse ``prompts_and_classes.txt`` as the DreamBooth dataset ships it."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the DreamBooth prompt table {path}: {exc.strerror or exc}.") from None
    return PromptTable(_class_table(lines, str(path)), _section_templates(lines, "Object Prompts", str(path)),
                       _section_templates(lines, "Live Subject Prompts", str(path)), str(path))


def _check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise ConfigError(f"DreamBooth prompt style must be one of {PROMPT_STYLES}, got '{style}'.")


def instance_prompt(subject: str, table: PromptTable, style: str = "official", token: str = "sks") -> str:
    """The training prompt: "a photo of wolf_plushie" (official) or "a sks stuffed animal" (rare_token, as the
    DreamBooth paper writes them)."""
    _check_style(style)
    class_name = table.class_of(subject)
    return f"a photo of {subject}" if style == "official" else f"a {token} {class_name}"


def evaluation_prompts(subject: str, table: PromptTable, style: str = "official", token: str = "sks",
                       class_noun: bool = False) -> list[str]:
    """The prompts images are generated for. ``official``: infer_lily.py's 25 prompts, which are the dataset's
    object list with "a {0} {1}" written "A picture of a <subject>" (it has no live-subject list, so dogs get the
    object contexts too). ``rare_token``: the dataset's list for the subject's kind, formatted with token and class.
    ``class_noun``: the same prompts with the subject's identifier replaced by its class noun, what DreamBench's
    CLIP-T compares an image with ("A picture of a toy in the jungle", "a toy in the jungle")."""
    _check_style(style)
    class_name = table.class_of(subject)
    if style == "rare_token":
        prompts = [template.format("" if class_noun else token, class_name) for template in table.templates(subject)]
        return [" ".join(prompt.split()) for prompt in prompts] if class_noun else prompts
    name = class_name if class_noun else subject
    return ["A picture of " + template.replace("{0} {1}", "{0}").format(name) for template in table.object_templates]


def subject_image_paths(folder: str | Path) -> list[Path]:
    """The subject's image files, sorted by name. train_lily.py takes them in directory order, which is not
    portable; sorting makes the seeded crops reproducible."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"DreamBooth subject folder {folder} does not exist.")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ConfigError(f"DreamBooth subject folder {folder} holds no image ({', '.join(IMAGE_SUFFIXES)}).")
    return paths


def read_image(path: str | Path) -> Image.Image:
    """An RGB image, EXIF orientation applied as train_lily.py does; decoded fully so a truncated file fails here."""
    try:
        with Image.open(path) as handle:
            handle.load()
            image = ImageOps.exif_transpose(handle)
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise ConfigError(f"DreamBooth image {path} is not a readable image ({exc}).") from None


def read_subject_images(folder: str | Path) -> list[Image.Image]:
    return [read_image(path) for path in subject_image_paths(folder)]


def check_resolution(resolution: int, vae_scale_factor: int) -> None:
    if resolution <= 0 or resolution % vae_scale_factor:
        raise ConfigError(f"DreamBooth resolution {resolution} must be a positive multiple of the VAE scale "
                          f"factor {vae_scale_factor} (SDXL: 8), so latents have whole sizes.")


@dataclass
class InstanceExample:
    """One preprocessed photo: pixels in [-1, 1] (3, resolution, resolution) and SDXL's micro-conditioning."""

    pixel_values: torch.Tensor
    original_size: tuple[int, int]  # (height, width) before the resize
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    target_size: tuple[int, int]

    @property
    def time_id_inputs(self) -> tuple[int, ...]:
        """original size + crop top-left + target size: the six add_time_ids of SDXL."""
        return (*self.original_size, *self.crop_top_left, *self.target_size)


def preprocess(image: Image.Image, resolution: int, generator: torch.Generator,
               center_crop: bool = False) -> InstanceExample:
    """Resize the shorter side to ``resolution`` (bilinear), crop a square, scale to [-1, 1]. The random crop is
    drawn once per image, top then left, as torchvision's ``RandomCrop.get_params`` draws it (train_lily.py), but
    from ``generator`` instead of the global RNG."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    original = (image.height, image.width)
    resized = F.resize(image, resolution, interpolation=InterpolationMode.BILINEAR)
    height, width = resized.height, resized.width
    if center_crop:
        top, left = max(0, round((height - resolution) / 2)), max(0, round((width - resolution) / 2))
    else:
        top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
    cropped = F.crop(resized, top, left, resolution, resolution)
    pixels = F.normalize(F.to_tensor(cropped), [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    return InstanceExample(pixels, original, (top, left), (resolution, resolution))


@dataclass
class InstanceData:
    """A subject ready for training: its prompt and preprocessed photos (crops fixed once, as train_lily.py)."""

    subject: str
    prompt: str
    examples: list[InstanceExample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def pixel_values(self) -> torch.Tensor:
        return torch.stack([example.pixel_values for example in self.examples])

    @property
    def time_id_inputs(self) -> list[tuple[int, ...]]:
        return [example.time_id_inputs for example in self.examples]


def prepare_instance_data(data_root: str | Path, subject: str, resolution: int = 1024, vae_scale_factor: int = 8,
                          seed: int = 0, style: str = "official", token: str = "sks",
                          center_crop: bool = False) -> InstanceData:
    """Validate and preprocess a subject of the DreamBooth dataset at ``data_root`` (subject folders next to
    ``prompts_and_classes.txt``): unknown subject, missing/empty folder, unreadable image, a resolution the VAE
    cannot take or an unknown prompt style are a ConfigError. No flip and no prior preservation (train_lily.sh)."""
    check_resolution(resolution, vae_scale_factor)
    table = read_prompt_table(Path(data_root) / TABLE_FILE)
    prompt = instance_prompt(subject, table, style, token)
    images = read_subject_images(Path(data_root) / subject)
    generator = torch.Generator().manual_seed(seed)
    return InstanceData(subject, prompt, [preprocess(image, resolution, generator, center_crop) for image in images])


# ------------------------------------------------------------------------------------------------ the task

CFG_ROUTINGS = ("joint", "per_half")


@dataclass
class SamplingSettings:
    """How images are generated after training (infer_lily.py: 50 steps, guidance 5.0; seeded here)."""

    images_per_prompt: int = 4
    steps: int = 50
    guidance: float = 5.0
    images_per_call: int = 1  # images per pipeline call (official 1); >1 is faithful with Lily's eval_pooling=sample
    cfg_routing: str = "joint"  # per-group routing of a CFG batch: joint pools each image's unconditional and
    #                             conditional rows together (what one image per call pools), per_half each row alone


@dataclass
class MetricSettings:
    """The metric models: hub ids or local paths; ``random`` builds tiny random-init ones (tests, CPU demo)."""

    dino: str = "facebook/dino-vits16"
    clip: str = "openai/clip-vit-large-patch14"


@dataclass
class DreamBoothSettings(TaskSettings):
    """task=dreambooth: one subject of the DreamBooth dataset (paper Fig. 2)."""

    subset: str = knob("wolf_plushie", help="the subject (a folder of the DreamBooth dataset)")
    data_dir: Optional[str] = knob(None, help="the dataset/ folder; None = the pinned google/dreambooth files")
    resolution: int = knob(1024)
    prompt_style: str = knob("official", choices=PROMPT_STYLES)
    token: str = knob("sks", help="the rare token of prompt_style=rare_token")
    center_crop: bool = knob(False)
    sample_vae: str = knob("base", choices=("base", "training"), help="base: decode samples with the base VAE")
    sampling: SamplingSettings = field(default_factory=SamplingSettings, metadata={"kind": "knob"})
    metrics: MetricSettings = field(default_factory=MetricSettings, metadata={"kind": "knob"})
    clip_text: str = knob("class", choices=CLIP_TEXTS,
                          help="class: CLIP-T compares each image with its prompt, the identifier replaced by the "
                               "class noun (DreamBench); prompt: with the prompt as sampled, identifier included")


DreamboothSettings = DreamBoothSettings  # the name records written before 0.2 give as their _schema_


DREAMBOOTH_SOURCE = "google/dreambooth"


def dataset_root(data_dir: str | None, subject: str) -> Path:
    """``data_dir`` (the dataset/ folder: subject folders beside prompts_and_classes.txt), or the subject and the
    prompt table of google/dreambooth at the commit the manifest pins (downloaded once, hash-checked, cached)."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise ConfigError(f"task.data_dir '{root}' does not exist.")
        return root
    from lilyexp.downloads import fetch_file, fetch_folder, load_manifest

    repo = load_manifest("dreambooth")
    hint = "set task.data_dir to a DreamBooth dataset/ folder (subject folders and prompts_and_classes.txt)"
    if not repo.under(f"dataset/{subject}"):
        known = sorted({p.split("/")[1] for p in repo.under("dataset") if p.count("/") == 2})
        raise ConfigError(f"subject '{subject}' is not in {DREAMBOOTH_SOURCE}; known: {', '.join(known)}.")
    fetch_file(repo, f"dataset/{TABLE_FILE}", hint=hint)
    return fetch_folder(repo, f"dataset/{subject}", hint=hint).parent


class DreamBoothTask:
    """One subject: the instance images and prompt for training, the prompts to sample after training, the real
    photos the metrics compare against, and the metrics (:mod:`lilyexp.tasks.dreambooth_metrics`)."""

    # bump when how this task scores changes: older records then count as outdated. 2: CLIP-T compares with the
    # prompt whose identifier is replaced by the class noun (clip_text=class; version 1 compared the raw prompt)
    scoring_version = 2

    def __init__(self, subset: str, data_dir: str | None = None, *, resolution: int = 1024, vae_scale_factor: int = 8,
                 prompt_style: str = "official", token: str = "sks", center_crop: bool = False, seed: int = 0,
                 train_limit: int | None = None, eval_limit: int | None = None, sample_vae: str = "base",
                 sampling: dict | None = None, metrics: dict | None = None, clip_text: str = "class"):
        for key, value in {"train_limit": train_limit, "eval_limit": eval_limit, "resolution": resolution}.items():
            if value is not None and value <= 0:  # refused now, not after the model loads (or after training)
                raise ConfigError(f"task.{key} must be positive, got {value}.")
        root = dataset_root(data_dir, subset)
        self.instance = prepare_instance_data(root, subset, resolution, vae_scale_factor, seed, prompt_style, token,
                                              center_crop)
        self.instance.examples = self.instance.examples[:train_limit]
        table = read_prompt_table(root / TABLE_FILE)
        self.prompts = evaluation_prompts(subset, table, prompt_style, token)[:eval_limit]
        if clip_text not in CLIP_TEXTS:
            raise ConfigError(f"task.clip_text must be one of {CLIP_TEXTS}, got '{clip_text}'.")
        self.clip_texts = dict(zip(self.prompts, evaluation_prompts(subset, table, prompt_style, class_noun=True))) \
            if clip_text == "class" else {}  # what CLIP-T compares each prompt's images with
        self.real_images = read_subject_images(root / subset)
        self.sampling = SamplingSettings(**(sampling or {}))
        check_sampling(self.sampling)
        self.metric_models = resolved_metric_models(MetricSettings(**(metrics or {})))
        self.subject, self.resolution = subset, resolution
        self.model_kwargs = {"sample_vae": sample_vae}

    def score(self, split: str, predictions: list, references: list) -> dict[str, float]:
        """DINO, CLIP-I and CLIP-T of generated images (``predictions``: (prompt, image) pairs) against the real
        photos (``references``), averaged over every generated image."""
        return self.evaluate(split, predictions, references)[0]

    def evaluate(self, split: str, predictions: list, references: list) -> tuple[dict[str, float], list[dict]]:
        """The averages (``<split>/dino``, ``/clip_i``, ``/clip_t``) and the per-prompt values."""
        from lilyexp.tasks.dreambooth_metrics import score_subject

        generated: dict[str, list] = {}
        for prompt, image in predictions:
            generated.setdefault(prompt, []).append(image)
        scores = score_subject(generated, references, *self.embedders, texts=self.clip_texts).as_dict()
        averages = {f"{split}/{name}": value for name, value in scores.items() if isinstance(value, float)}
        return averages, scores["per_prompt"]

    @functools.cached_property
    def embedders(self) -> tuple[Any, Any]:
        """(DINO, CLIP) embedders, loaded on first use (after training)."""
        from lilyexp.tasks import dreambooth_metrics as m

        dino = m.tiny_dino() if self.metric_models.dino == "random" else m.load_dino(self.metric_models.dino)
        clip = m.tiny_clip() if self.metric_models.clip == "random" else m.load_clip(self.metric_models.clip)
        return dino, clip


def resolved_metric_models(models: MetricSettings) -> MetricSettings:
    """The metric models found now, before any training (see ``resolve_metric_model``)."""
    from lilyexp.tasks.dreambooth_metrics import CLIP_SWITCH, DINO_SWITCH, resolve_metric_model

    return MetricSettings(dino=resolve_metric_model(models.dino, DINO_SWITCH),
                          clip=resolve_metric_model(models.clip, CLIP_SWITCH))


def check_sampling(sampling: SamplingSettings) -> None:
    if min(sampling.images_per_prompt, sampling.steps, sampling.images_per_call) < 1:
        raise ConfigError("task.sampling needs images_per_prompt, steps and images_per_call of at least 1.")
    if sampling.cfg_routing not in CFG_ROUTINGS:
        raise ConfigError(f"task.sampling.cfg_routing must be one of {CFG_ROUTINGS}, got '{sampling.cfg_routing}'.")
