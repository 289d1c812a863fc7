"""The video path end to end on a tiny video of real faces (scikit-image) with a matching subtitle file."""

import json

import numpy as np
import pytest

from agreement.optional import optional_import
from entities.backends import (
    DlibDetector,
    DlibEmbedder,
    OpenClipEmbedder,
    OpenCVCascadeDetector,
    make_detector,
)
from entities.cli import main
from entities.names import Gazetteer
from entities.video import VideoError, VideoOptions, records_from_video
from tests.entities.media import faces, write_srt, write_video

CAST = ["Ava", "Ben", "Cleo"]


@pytest.fixture(scope="module")
def episode(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video")
    video = write_video(folder / "episode.avi", [0, 1, 2, 0, 1, 2])
    subtitles = write_srt(
        folder / "episode.srt",
        [
            (0.0, 1.9, "(Ava:) Hello there."),
            (2.0, 3.9, "(Ben:) Hi, Ava."),  # Ava is mentioned while off screen
            (4.0, 5.9, "(Cleo:) Morning."),
            (6.0, 7.9, "(Ava:) Again."),
            (8.0, 9.9, "(Ben:) Yes."),
            (10.0, 11.9, "(Dan:) Where is Cleo?"),  # Dan is not in the cast: Unknown
        ],
    )
    return video, subtitles


def test_video_end_to_end_with_dlib(episode, tmp_path):
    video, subtitles = episode
    run_dir = tmp_path / "run"
    args = ["--video", str(video), "--subtitles", str(subtitles), "--names.cast", "[Ava, Ben, Cleo]"]
    args += ["--discovery.k", "3", "--video_options.sample_fps", "1", "--run_dir", str(run_dir)]
    summary = main([*args, "--self_training.enabled", "false"])
    rows = json.loads((run_dir / "names.json").read_text())
    assert summary["faces"] == len(rows) == 12  # one face in each of 12 sampled frames
    truth = [CAST[(int(r["time"]) // 2) % 3] for r in rows]
    assert [r["name"] for r in rows] == truth
    assert any(r["weak_names"] == ["Dan", "Cleo"] for r in rows)
    gallery = (run_dir / "gallery.html").read_text()
    assert gallery.count("<img") == 12 and "Ava (4 faces)" in gallery
    assert all((run_dir / "crops" / f"face_{i:06d}.jpg").is_file() for i in range(12))
    assert (run_dir / "names.csv").read_text().count("\n") == 13


def test_opencv_detector_with_dlib_embedding(episode):
    video, subtitles = episode
    options = VideoOptions(detector="opencv", sample_fps=1)
    records = records_from_video(video, subtitles, Gazetteer(CAST), options)
    assert len(records) == 12 and records.embeddings.shape == (12, 128)
    # Same person in different frames is closer than different people (dlib's 0.6 rule).
    x = records.embeddings
    same = np.linalg.norm(x[0] - x[6])
    other = min(np.linalg.norm(x[0] - x[2]), np.linalg.norm(x[0] - x[4]))
    assert same < 0.6 < other


def test_dlib_backends_on_a_real_face():
    picture = np.full((200, 200, 3), 110, np.uint8)
    picture[50:150, 50:150] = faces()[0]
    boxes = DlibDetector().detect(picture)
    assert len(boxes) == 1 and boxes[0][0] >= 40 and boxes[0][2] <= 160
    assert len(OpenCVCascadeDetector().detect(picture)) == 1
    vector = DlibEmbedder().embed(picture, boxes)
    assert vector.shape == (1, 128) and np.isfinite(vector).all()


def test_unreadable_video_raises(tmp_path):
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"RIFF\x00\x00not a video at all" * 10)
    subtitles = write_srt(tmp_path / "s.srt", [(0.0, 1.0, "(Ava:) Hi")])
    with pytest.raises(VideoError, match=r"broken\.avi: cannot be decoded"):
        records_from_video(broken, subtitles, Gazetteer(CAST), VideoOptions(detector="opencv"))


def test_frames_without_faces_warn_with_counts(tmp_path):
    video = write_video(tmp_path / "gaps.avi", [0, None, 1])
    subtitles = write_srt(tmp_path / "gaps.srt", [(0.0, 1.9, "(Ava:) Hi"), (4.0, 5.9, "(Ben:) Bye")])
    options = VideoOptions(detector="opencv", sample_fps=1)
    with pytest.warns(UserWarning, match="2 of 6 sampled frames have no detected face"):
        records = records_from_video(video, subtitles, Gazetteer(CAST), options)
    assert len(records) == 4
    empty = write_video(tmp_path / "empty.avi", [None])
    with pytest.raises(VideoError, match="no face was detected in any of the 2 sampled frames"):
        records_from_video(empty, subtitles, Gazetteer(CAST), options)


def test_missing_backend_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install 'agreement-ssl\[faces\]'"):
        optional_import("a_face_backend_that_is_not_installed", extra="faces", purpose="face detection")
    with pytest.raises(ValueError, match="unknown face detector"):
        make_detector("mtcnn")


@pytest.fixture(scope="module")
def tiny_clip_weights(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    from agreement.clip import build_clip

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        model = build_clip("prompts-tiny-vit").model
    path = tmp_path_factory.mktemp("clip") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_open_clip_embedder_loads_local_weights_and_embeds_crops(tiny_clip_weights):
    import torch
    from PIL import Image

    model, path = tiny_clip_weights
    embedder = OpenClipEmbedder("prompts-tiny-vit", str(path), margin=0.0)
    picture = np.full((120, 160, 3), 90, np.uint8)
    picture[10:110, 20:120] = faces()[0]
    boxes = np.array([[20, 10, 120, 110], [0, 0, 40, 40]])
    vectors = embedder.embed(picture, boxes)
    assert vectors.shape == (2, 32) and embedder.dim == 32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    # By hand: the crop, resized to the model's 32 px (bicubic), normalised with CLIP's mean and std.
    face = Image.fromarray(picture[10:110, 20:120]).resize((32, 32), Image.BICUBIC)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    pixels = (torch.from_numpy(np.array(face)).permute(2, 0, 1).float() / 255 - mean) / std
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.eval().encode_image(pixels[None]), dim=1)
    np.testing.assert_allclose(vectors[0], expected[0].numpy(), atol=1e-4)
    assert embedder.embed(picture, np.zeros((0, 4))).shape == (0, 32)


def test_video_path_with_the_open_clip_embedder(episode, tiny_clip_weights):
    video, subtitles = episode
    options = VideoOptions(
        detector="opencv",
        embedder="open_clip",
        clip_model="prompts-tiny-vit",
        clip_weights=str(tiny_clip_weights[1]),
    )
    records = records_from_video(video, subtitles, Gazetteer(CAST), options)
    assert records.embeddings.shape == (len(records), 32) and len(records) > 0


def test_open_clip_embedder_bad_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        OpenClipEmbedder("prompts-tiny-vit", str(tmp_path / "missing.safetensors"))
    other = tmp_path / "other.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"visual.proj": torch.zeros(3, 3)}, str(other))
    with pytest.raises(ValueError, match="does not match the open_clip architecture"):
        OpenClipEmbedder("prompts-tiny-vit", str(other))
