"""Compositional accuracy: definitions on constructed cases with known answers (an oracle recognizer that reports
exactly the given detections), the recognizer's targets/decoding round trip, its cached reproducible training (a
tiny recipe), and the torchmetrics sum-sync."""

import math
from dataclasses import replace

import pytest
import torch

from ditlab.data.scene_grammar import SIZE_PIXELS, SIZES
from ditlab.data.scenes import DigitScenes, SceneAttributes
from ditlab.metrics.compositional import (
    CompositionalAccuracy,
    captions_file_accuracy,
    compositional_accuracy,
    score_prompt,
)
from ditlab.metrics.scene_recognizer import (
    CROP,
    GRID,
    CropNet,
    Detection,
    RecognizerRecipe,
    SceneNet,
    crops,
    peaks,
    scene_recognizer,
    targets,
    to_input,
)

TINY = RecognizerRecipe(num_train=96, num_eval=16, widths=(4, 8, 8), crop_widths=(4, 8), epochs=1, crop_epochs=1,
                        batch_size=32)


def truth(attributes: SceneAttributes) -> list[Detection]:
    return [Detection(d, c, s, p, 1.0) for d, c, s, p in zip(attributes.digits, attributes.colours, attributes.sizes,
                                                             attributes.positions)]  # fmt: skip


class Oracle(torch.nn.Module):
    """Reports, for the i-th image of each call, the detections of ``scenes[i]`` (after ``edit``)."""

    def __init__(self, scenes: list[SceneAttributes]) -> None:
        super().__init__()
        self.scenes, self.start = scenes, 0
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images: torch.Tensor) -> list[list[Detection]]:
        found = [truth(s) for s in self.scenes[self.start : self.start + len(images)]]
        self.start += len(images)
        return found


@pytest.fixture(scope="module")
def scenes() -> list[SceneAttributes]:
    return DigitScenes("validation").attributes(range(40))


def two(scenes):
    return next(s for s in scenes if s.count == 2)


def test_own_attributes_score_one_and_captions_equal_attributes(scenes):
    images = torch.zeros(len(scenes), 3, 32, 32)
    by_attributes = compositional_accuracy(images, scenes, Oracle(scenes))
    by_captions = compositional_accuracy(images, [s.caption() for s in scenes], Oracle(scenes))
    assert by_attributes == by_captions
    assert all(by_attributes[key] == 1.0 for key in ("digit", "colour", "size", "count", "position", "whole"))
    assert by_attributes["num_prompts"] == 40


def test_swapped_colours_fail_colour_and_whole_only(scenes):
    scene = two(scenes)
    asked = replace(scene, colours=scene.colours[::-1])
    score = score_prompt(truth(scene), asked)
    assert (score["digit"], score["colour"], score["count"], score["whole"]) == (2, 0, 1, 0)


def test_opposite_relation_fails_position(scenes):
    scene = two(scenes)
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[scene.relation]
    score = score_prompt(truth(scene), replace(scene, relation=opposite))
    assert (score["digit"], score["colour"], score["position"], score["whole"]) == (2, 2, 0, 0)


def test_missing_and_extra_digits_fail_count(scenes):
    scene = two(scenes)
    missing = score_prompt(truth(scene)[:1], scene)
    assert (missing["digit"], missing["count"], missing["position"], missing["whole"]) == (1, 0, 0, 0)
    extra = score_prompt(truth(scene) + [Detection(5, "red", "small", (0.5, 0.5), 0.9)], scene)
    assert (extra["digit"], extra["colour"], extra["count"], extra["position"], extra["whole"]) == (2, 2, 0, 1, 0)
    nothing = score_prompt([], scene)
    assert (nothing["digit"], nothing["count"], nothing["whole"]) == (0, 0, 0)


def test_wrong_digit_and_matching_prefers_the_right_one():
    asked = SceneAttributes([3, 7], ["red", "blue"], ["small", "large"], relation="left of")
    found = [Detection(7, "blue", "large", (0.8, 0.5), 1.0), Detection(3, "red", "small", (0.2, 0.5), 1.0)]
    assert score_prompt(found, asked)["whole"] == 1  # detection order does not matter
    found[0] = Detection(1, "blue", "large", (0.8, 0.5), 1.0)
    score = score_prompt(found, asked)
    assert (score["digit"], score["colour"], score["position"], score["whole"]) == (1, 1, 0, 0)


def test_mixed_batch_rates_are_the_known_fractions(scenes):
    ones = [s for s in scenes if s.count == 1][:2]
    pair = two(scenes)
    asked = [ones[0], replace(ones[1], colours=["white" if ones[1].colours[0] != "white" else "red"]), pair]
    images = torch.zeros(3, 3, 32, 32)
    result = compositional_accuracy(images, asked, Oracle([ones[0], ones[1], pair]))
    assert result["colour"] == 3 / 4 and result["digit"] == 1.0 and result["whole"] == 2 / 3
    assert result["position"] == 1.0 and result["count"] == 1.0
    no_relation = compositional_accuracy(images[:1], ones[:1], Oracle(ones[:1]))
    assert math.isnan(no_relation["position"])


def test_states_sum_across_processes(scenes):
    """torchmetrics' sync with a gather that returns both processes' states equals one process over all."""
    images = torch.zeros(len(scenes), 3, 32, 32)
    asked = [replace(s, colours=s.colours[::-1]) if i % 3 == 0 else s for i, s in enumerate(scenes)]
    single = CompositionalAccuracy(Oracle(scenes))
    single.update(images, asked)
    other = []

    def gather(tensor, group=None):  # states are gathered one by one in registration order
        return [tensor, other.pop(0)]

    first = CompositionalAccuracy(Oracle(scenes[:25]), dist_sync_fn=gather, distributed_available_fn=lambda: True)
    second = CompositionalAccuracy(Oracle(scenes[25:]))
    first.update(images[:25], asked[:25])
    second.update(images[25:], asked[25:])
    other.extend(getattr(second, key) for key in first._reductions)
    assert first.compute() == single.compute() and not other
    assert single.whole.item() < single.prompts.item() == 40  # a non-trivial case
    assert first.prompts.item() == 25  # after compute, each process keeps its own counts


def test_targets_decode_back_to_the_centres_and_sizes(scenes):
    """Detector outputs that are the targets themselves decode to the scenes' own centres and sizes."""
    target = targets(scenes)
    out = {"objectness": (target["objectness"] * 20 - 10)[:, None], "offset": target["offset"],
           "size": torch.nn.functional.one_hot(target["size"].clamp(min=0), 2).permute(0, 3, 1, 2).float()}  # fmt: skip
    owners, centres, sizes, _ = peaks(out)
    for i, scene in enumerate(scenes):
        mine = owners == i
        found = sorted(zip(map(tuple, centres[mine].tolist()), sizes[mine].tolist()))
        expected = sorted(zip(scene.positions, [SIZES.index(size) for size in scene.sizes]))
        assert [size for _, size in found] == [size for _, size in expected]
        assert [c for c, _ in found] == [pytest.approx(c, abs=1e-5) for c, _ in expected]
    assert target["objectness"].shape == (40, GRID, GRID) and target["objectness"].sum() == sum(s.count for s in scenes)


def test_crops_are_centred_on_the_digit():
    """A crop around a scene's digit holds that digit: the brightest pixels sit in its middle."""
    item = DigitScenes("validation")[1]
    scene = item["attributes"]
    sides = torch.tensor([SIZE_PIXELS[s] for s in scene.sizes])
    cut = crops(item["image"][None], torch.zeros(scene.count, dtype=torch.long), torch.tensor(scene.positions), sides)
    assert cut.shape == (scene.count, 3, CROP, CROP)
    ink = cut.amax(1) - cut.amin(1) > 0.5  # coloured ink against a grey or dark background
    assert ink[:, 2:-2, 2:-2].float().mean() > 5 * ink[:, :1].float().mean().clamp(min=0.01)


def test_tiny_recognizer_is_cached_by_recipe_and_reproducible(tmp_path):
    first = scene_recognizer(tmp_path, TINY)
    files = list(tmp_path.glob("scene-recognizer-*.pt"))
    assert [f.name for f in files] == [f"scene-recognizer-{TINY.digest()}.pt"]
    again = scene_recognizer(tmp_path, TINY)
    assert again.fingerprint == first.fingerprint and again.train_seconds == first.train_seconds
    retrained = scene_recognizer(tmp_path, TINY, retrain=True)
    assert retrained.fingerprint == first.fingerprint  # the same weights from the same recipe
    assert set(first.accuracy) >= {"digit", "colour", "count", "position", "whole"}
    found = first(DigitScenes("test", 64).images(range(4)))
    assert len(found) == 4 and all(isinstance(d, Detection) for image in found for d in image)


def test_bad_inputs_are_one_line_errors(tmp_path, scenes):
    with pytest.raises(ValueError, match="digit-scenes-v1"):
        scene_recognizer(tmp_path, replace(TINY, dataset="digit-scenes-v0"))
    with pytest.raises(ValueError, match="images"):
        to_input(torch.zeros(2, 4, 32, 32))
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        CompositionalAccuracy(Oracle(scenes)).update(torch.zeros(2, 3, 32, 32), scenes[:3])
    (tmp_path / "captions.txt").write_text(scenes[0].caption() + "\n")
    with pytest.raises(ValueError, match="1 captions for 2 images"):
        captions_file_accuracy(torch.zeros(2, 3, 32, 32), tmp_path / "captions.txt", Oracle(scenes))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        captions_file_accuracy(torch.zeros(1, 3, 32, 32), tmp_path / "none.txt", Oracle(scenes))
    assert captions_file_accuracy(torch.zeros(1, 3, 32, 32), tmp_path / "captions.txt", Oracle(scenes))["whole"] == 1


def test_network_shapes():
    out = SceneNet(TINY)(torch.zeros(2, 3, 32, 32))
    assert {key: tuple(value.shape[1:]) for key, value in out.items()} == {
        "objectness": (1, GRID, GRID), "size": (2, GRID, GRID), "offset": (2, GRID, GRID)}  # fmt: skip
    digit, colour = CropNet(TINY)(torch.zeros(5, 3, CROP, CROP))
    assert digit.shape == (5, 10) and colour.shape == (5, 8)


def test_cached_default_recognizer_scores_real_scenes_high_and_wrong_prompts_low():
    """End to end on the default recognizer when it is already built (building it takes minutes on 2 cores:
    ``python bench/compositional.py``); skipped otherwise."""
    from ditlab.metrics.features import cache_root

    if not (cache_root() / f"scene-recognizer-{RecognizerRecipe().digest()}.pt").is_file():
        pytest.skip("the default scene recognizer is not cached; build it with python bench/compositional.py")
    recognizer = scene_recognizer()
    scenes = DigitScenes("validation", 32, 200)
    images, asked = scenes.images(range(200)), scenes.attributes(range(200))
    assert compositional_accuracy(images, asked, recognizer)["whole"] >= 0.9
    several = [i for i, s in enumerate(asked) if len(set(s.digits)) > 1]  # distinct digits: a swap is a real error
    swapped = [replace(asked[i], colours=asked[i].colours[1:] + asked[i].colours[:1]) for i in several]
    result = compositional_accuracy(images[several], swapped, recognizer)
    assert result["colour"] < 0.1 and result["whole"] < 0.05 and result["digit"] >= 0.9
    shuffled = compositional_accuracy(images, asked[1:] + asked[:1], recognizer)
    assert shuffled["whole"] < 0.05


def score_share_of_prompts(rank: int, world: int, port: int, out, lookup) -> None:
    """One gloo rank: compositional accuracy of its contiguous share of 40 scenes (odd ones asked for the next
    scene's caption), reduced over the ranks."""
    import json

    import torch.distributed as dist

    from ditlab.metrics import text_eval

    torch.set_num_threads(1)
    text_eval._scene_recognizer = lambda cache_dir: lookup  # a forked process: patched here only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    images, asked = shared_prompts()
    share = slice(rank * 20, (rank + 1) * 20 - rank)  # rank 1 holds one scene fewer
    (out / f"rank{rank}.json").write_text(json.dumps(text_eval.compositional_of(images[share], asked[share])))
    dist.destroy_process_group()


def shared_prompts() -> tuple[torch.Tensor, list[str]]:
    scenes = DigitScenes("validation")
    captions = scenes.captions(range(40))
    asked = [captions[(i + 1) % 40] if i % 2 else captions[i] for i in range(40)][:39]
    return scenes.images(range(39)), asked


def test_two_gloo_processes_score_what_one_scores(tmp_path, validation_lookup, monkeypatch):
    """``compositional_of`` under DDP: each rank scores its share, every rank gets the rates of all 39 prompts."""
    import json
    import multiprocessing
    import socket

    from ditlab.metrics import text_eval

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("fork")
    ranks = [context.Process(target=score_share_of_prompts, args=(rank, 2, port, tmp_path, validation_lookup))
             for rank in range(2)]  # fmt: skip
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
    assert [process.exitcode for process in ranks] == [0, 0]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    monkeypatch.setattr(text_eval, "_scene_recognizer", lambda cache_dir: validation_lookup)
    single = text_eval.compositional_of(*shared_prompts())
    assert results[0] == results[1] == pytest.approx(single)
    assert 0.4 < single["compositional_accuracy"] < 0.7  # the even half is right, most of the odd half wrong
