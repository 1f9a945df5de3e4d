"""Zero-shot prompts per task: named template sets, raw or cleaned class names, and a
class-balanced subset of the test split (`data.zeroshot_eval`).

The presets follow the study's code where the papers say nothing (docs/fidelity.md):
paper21 scored CIFAR-100 with ``a photo of a {name}`` and the dataset's raw label names
(``aquarium_fish``: 60.22% pretrained ViT-B/32); its later protocol with ``a photo of a
{name}.`` and underscores replaced by spaces (61.33%), and CIFAR-10 on 2,000 class-balanced
test images.
"""

from __future__ import annotations

from typing import Any

from attndrift.data.base import ImageTask
from attndrift.data.names import TEMPLATES
from attndrift.data.splits import balanced_subset

# CLIP's published CIFAR-10/100 prompt ensemble (Radford et al. 2021, the repository's
# prompt list), written out here.
OPENAI_CIFAR = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.",
    "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.",
    "a bad photo of the {}.", "a good photo of the {}.", "a photo of the small {}.",
    "a photo of the big {}.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "paper21": ("a photo of a {}",),  # no full stop: the earlier protocol's prompt
    "later": ("a photo of a {}.",),  # the later protocol's prompt
    "openai_cifar": OPENAI_CIFAR,
    **{name: tuple(t) for name, t in TEMPLATES.items()},
}


def check_templates(spec: str | list[str] | None) -> None:
    """Raise `ValueError` (one line) unless ``spec`` is None, a known set name, or a non-empty
    list of templates that each hold exactly one ``{}``."""
    if spec is None:
        return
    if isinstance(spec, str):
        if spec not in TEMPLATE_SETS:
            raise ValueError(f"unknown template set {spec!r}; known: {', '.join(TEMPLATE_SETS)} "
                             "(or give a list of templates with one {{}} each)")
        return
    if not spec:
        raise ValueError("templates is an empty list; give at least one template")
    bad = [t for t in spec if t.count("{}") != 1 or t.replace("{}", "").count("{")
           or t.replace("{}", "").count("}")]
    if bad:
        raise ValueError(f"template {bad[0]!r} must hold exactly one {{}} for the class name "
                         "and no other braces")


def resolve_templates(spec: str | list[str] | None, own: list[str]) -> list[str]:
    """The templates ``spec`` names: the task's ``own`` for None."""
    check_templates(spec)
    if spec is None:
        return list(own)
    return list(TEMPLATE_SETS[spec]) if isinstance(spec, str) else list(spec)


def zeroshot_view(task: ImageTask, *, templates: str | list[str] | None = None,
                  names: str = "clean", images: int | None = None,
                  seed: int = 0) -> tuple[ImageTask, dict[str, Any]]:
    """``task`` as zero-shot scores it: its templates, class names (``clean``: the prompt
    names; ``raw``: the dataset's stored label names) and, with ``images``, a class-balanced
    subset (`balanced_subset`, seeded). Returns the task and its entry for the record."""
    if names not in ("clean", "raw"):
        raise ValueError(f"names must be clean or raw, got {names!r}")
    chosen = resolve_templates(templates, task.templates)
    class_names = list(task.raw_names or task.class_names) if names == "raw" \
        else list(task.class_names)
    view = ImageTask(task.name, task.images, task.labels, class_names, chosen, task.raw_names)
    if images is not None:
        if images > len(task):
            raise ValueError(f"{task.name}: data.zeroshot_eval asks for {images} images, the "
                             f"test split has {len(task)}; lower images or set it to null")
        view = view.subset(balanced_subset(task.labels, images, seed), f"{task.name}/subset")
    entry = {"templates": chosen, "names": names, "images": len(view),
             "content": view.fingerprint()}
    return view, entry


def zeroshot_tasks(names: list[str], evals: dict[str, Any], *, image_size: int = 224,
                   progress: bool = False) -> tuple[dict[str, ImageTask], dict[str, Any]]:
    """The transfer tasks of a run, each test split as `zeroshot_view` makes it from its
    ``data.zeroshot_eval`` entry (a model with ``model_dump``, a dict, or absent: the
    dataset's own prompts on the whole split), and each task's prompt entry for the record."""
    from attndrift.data.registry import load_task

    tasks, prompts = {}, {}
    for name in names:
        spec = evals.get(name)
        options = spec.model_dump() if hasattr(spec, "model_dump") else dict(spec or {})
        task = load_task(name, "test", image_size=image_size, progress=progress)
        tasks[name], prompts[name] = zeroshot_view(task, **options)
    return tasks, prompts
