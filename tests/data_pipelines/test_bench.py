import argparse
import json

from PIL import Image

from data_pipelines.read.shards import ShardWriter, iter_raw_samples
from data_pipelines.tools.bench import photo_jpeg, register
from tests.conftest import kakehashi


def run_bench(argv):
    parser = argparse.ArgumentParser(prog="kakehashi bench")
    register(parser.add_subparsers(dest="bench_command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_bench_data_measures_both_paths_on_synthetic_photos(tmp_path, capsys):
    # --workers 1: a worker process, so the test process is not pinned to one core as --workers 0 would do
    assert run_bench(["data", "--synth", str(tmp_path), "--synth-samples", "12", "--samples", "8",
                      "--image-size", "64", "--workers", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples_per_s"] > 0 and report["baseline_samples_per_s"] > 0
    # the ratio is of the unrounded rates; the report rounds each rate to 0.1, so recomputing it may differ in the
    # last digit (3.37 vs 3.38 in one CI run)
    assert abs(report["ratio"] - report["samples_per_s"] / report["baseline_samples_per_s"]) < 0.02
    samples = [s for path in sorted(tmp_path.glob("photos-*.tar")) for s in iter_raw_samples(str(path))]
    assert len(samples) == 12 and samples[0].image_exts == ["jpg"]
    assert (tmp_path / "index.json").is_file()


def test_bench_data_tiles_both_paths(tmp_path, capsys):
    """--tiles: the loader tiles in its workers, the baseline is LlavaOnevisionImageProcessor on the same grids."""
    assert run_bench(["data", "--synth", str(tmp_path), "--synth-samples", "8", "--samples", "8",
                      "--image-size", "64", "--workers", "1", "--tiles", "4", "--rounds", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tiles"] == 4 and report["samples_per_s"] > 0 and report["baseline_samples_per_s"] > 0


def test_bench_data_json_is_the_only_stdout_of_the_cli_even_when_the_loader_skips_samples(tmp_path, make_png):
    """The kakehashi CLI logs to stdout; with --json the loader's 'skipping bad sample' lines go to stderr."""
    with ShardWriter(tmp_path, "mixed", 10) as writer:
        for i in range(4):
            writer.write(f"good{i}", {"caption": f"赤い円{i}。"}, [("png", make_png())])
            writer.write(f"bad{i}", {"conversations": []}, [("png", make_png())])
    result = kakehashi("bench", "data", tmp_path / "mixed-000000.tar", "--samples", "8", "--image-size", "64",
                       "--rounds", "1", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["samples_per_s"] > 0 and report["shards"] == 1
    assert "skipping bad sample: " in result.stderr


def test_synthetic_photos_look_like_photos():
    import io

    import numpy as np

    data = photo_jpeg(np.random.default_rng(1))
    image = Image.open(io.BytesIO(data))
    assert image.size == (640, 480) and image.format == "JPEG"
    assert 40_000 < len(data) < 200_000  # noisy, textured content: not a flat image that compresses to nothing
    pixels = np.asarray(image).astype(int)
    assert pixels.std() > 20
