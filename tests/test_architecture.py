"""The code's shape, checked: no import cycles inside a package (function-level imports included), no branching on
the model family outside train/models/, functions in train/ that fit on a screen, and weights-only torch.load."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from train.collector import FULL_COLLECTION_EVERY

PACKAGES = ("train", "data_pipelines")
MAX_FUNCTION_LINES = 60


def modules(package: str) -> dict[str, Path]:
    """Dotted module name inside `package` ("engine", "models.llava", "models" for its __init__) -> file."""
    found = {}
    for path in sorted((REPO / package).rglob("*.py")):
        parts = path.relative_to(REPO / package).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name:
            found[name] = path
    return found


def imported(path: Path, package: str, known: set[str]) -> set[str]:
    """The modules of `package` that `path` imports anywhere in it (module level or inside functions)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    found = set()
    for name in names:
        if name.startswith(package + "."):
            inner = name[len(package) + 1:]
            while inner and inner not in known:  # `from train.models.base import X` -> models.base
                inner = inner.rpartition(".")[0]
            if inner:
                found.add(inner)
    return found


def import_graph(package: str) -> dict[str, set[str]]:
    files = modules(package)
    graph = {name: imported(path, package, set(files)) - {name} for name, path in files.items()}
    for name in graph:  # importing a.b imports package a first; a's own import of a.b is not a cycle
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done, stack = set(), []

    def visit(name):
        if name in stack:
            return stack[stack.index(name):] + [name]
        if name in done:
            return None
        stack.append(name)
        for target in sorted(graph[name]):
            cycle = visit(target)
            if cycle:
                return cycle
        stack.pop()
        done.add(name)
        return None

    return next((cycle for name in sorted(graph) if (cycle := visit(name))), None)


def test_the_import_graph_sees_function_level_imports_and_subpackages():
    data, train = import_graph("data_pipelines"), import_graph("train")
    assert {"tools.convert", "tools.verify", "tools.cli_common"} <= data["tools.commands"]
    assert "batch.loader" in data["tools.bench"]  # imported inside loader_samples_per_s
    assert {"models", "models.base"} <= train["run"] and "lora" in train["stages"]  # lora: inside plan_stage
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_of_a_package_import_each_other_without_cycles(package):
    cycle = find_cycle(import_graph(package))
    assert cycle is None, f"import cycle in {package}: " + " -> ".join(cycle)


def test_shared_modules_stay_below_the_commands_that_use_them():
    data, train = import_graph("data_pipelines"), import_graph("train")
    assert data["errors"] == set() and data["output"] == set() and train["errors"] == set()
    assert not data["tools.cli_common"] & {"tools.commands", "tools.convert", "tools.verify", "tools.bench"}
    families = {m for m in train if m == "models" or m.startswith("models.")}
    assert set().union(*(train[m] for m in families)) - families <= {"errors"}  # families know no run, recipe, loop


def test_no_module_under_train_imports_the_cli():
    # the CLI is a front-end over the library: library code reached from it (periodic eval, the bench) must not
    # reach back into it; the `python -m train` entry point is a front-end too
    front_ends = {"cli", "__main__"}
    graph = import_graph("train")
    graph["__main__"] = imported(REPO / "train" / "__main__.py", "train", set(graph))
    importers = sorted(name for name, targets in graph.items() if "cli" in targets and name not in front_ends)
    assert not importers, f"modules importing train.cli: {importers}"
    assert "cli" in graph["__main__"]  # the scan sees the one import that is allowed


def test_the_cli_module_imports_nothing_heavy():
    # every loader worker imports the main module of the process that started it (`python -m train.cli`, the
    # `kakehashi` script) at each stage start: with torch and transformers behind it, a stage's first batch waited
    # seconds on two fresh imports of them. Its parser loads neither model code nor torch (the data tools decode with
    # Pillow; data_pipelines/image/pixels.py, where tensors begin, is imported where a command runs): 1 s off every
    # command, and `kakehashi train` starts the loader's forkserver that much sooner
    probe = ("import sys, train.cli\n"
             "heavy = lambda: sorted(m for m in ('torch', 'transformers', 'deepspeed', 'train.recipe') if m in sys.modules)\n"
             "print(heavy()); train.cli.build_parser(); print(heavy())")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["[]", "[]"]


def test_a_command_rarely_walks_what_start_up_imported_and_never_at_exit():
    # train/collector.py: full collections over the ~400,000 objects of torch, transformers and
    # DeepSpeed cost a training process 0.8 s while importing them and 1.1 s at exit, and freed nothing
    probe = ("import gc, sys, train.cli\n"
             "code = train.cli.main(['recipe', 'check', sys.argv[1], '--json'])\n"
             "print(code, gc.get_threshold()[2], gc.get_freeze_count(), len(gc.get_objects()))")
    done = subprocess.run([sys.executable, "-c", probe, "recipes/tiny/asagi-2stage.yaml"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    code, every, frozen, left = map(int, done.stdout.splitlines()[-1].split())
    assert (code, every) == (0, FULL_COLLECTION_EVERY) and every > 10  # Python's default is 10
    assert frozen > 100_000 and left < 1_000  # at exit, the interpreter's last collections have next to nothing to walk


def test_each_metric_name_says_its_scale():
    from train.benchmarks import metrics

    assert not hasattr(metrics, "rouge_l")  # which one? eval-mm's 0-100 MeCab one and ours 0-1 per character differ
    assert metrics.rouge_l_mecab_pct("赤色です。", "赤色です。") == 100.0
    assert metrics.rouge_l_chars_f1("赤色です。", "赤色です。") == 1.0


DATA_PATH = ("read", "image", "render", "batch")  # data_pipelines' sub-packages, in the order data flows


def test_the_data_path_flows_one_way():
    """A step of the data path imports only the steps before it (and errors/output), never the command-line tools
    or the synthetic sets beside it."""
    graph = import_graph("data_pipelines")
    backwards = []
    for name, targets in graph.items():
        step = name.split(".")[0]
        if step not in DATA_PATH:
            continue
        allowed = set(DATA_PATH[:DATA_PATH.index(step) + 1]) | {"errors", "output"}
        backwards += [f"{name} -> {t}" for t in targets if t.split(".")[0] not in allowed]
    assert not backwards, "the data path imports against its flow: " + "; ".join(sorted(backwards))
    assert "read.shard_reader" in graph["batch.batches"]  # the scan sees the imports it judges


def family_branches(path: Path) -> list[str]:
    """Places in `path` that test what kind of model they hold: hasattr / getattr on a model, processor or config,
    a comparison with a vision encoder kind, or isinstance with a model class."""
    found = []
    kinds = {"siglip", "clip", "qwen2_vl", "mlp2x_gelu", "qwen2_vl_merger"}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("hasattr", "getattr") and node.args:
            target = ast.unparse(node.args[0])
            if re.search(r"model|llava|processor|config|vision|tower|module", target):
                found.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
        if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value in kinds
                                                 for c in [node.left, *node.comparators]):
            found.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
            if re.search(r"Llava|Qwen|Siglip|CLIP", ast.unparse(node.args[1])):
                found.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    return found


def test_no_code_outside_train_models_branches_on_the_model_family():
    outside = [path for package in PACKAGES for path in modules(package).values()
               if not path.is_relative_to(REPO / "train" / "models")]
    branches = [b for path in outside for b in family_branches(path)]
    assert not branches, "family branches outside train/models/: " + "; ".join(branches)
    assert family_branches(REPO / "train" / "models" / "llava.py")  # the scan finds the ones that are allowed


def long_functions(path: Path) -> list[str]:
    return [f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_in_train_is_longer_than_a_screen():
    too_long = [f for path in modules("train").values() for f in long_functions(path)]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: " + "; ".join(too_long)


def test_every_torch_load_in_the_source_is_weights_only():
    calls = []
    for path in list((REPO / "train").rglob("*.py")) + list((REPO / "data_pipelines").rglob("*.py")):
        for match in re.finditer(r"torch\.load\(([^)]*)\)", path.read_text()):
            calls.append((path.name, match.group(1)))
    assert calls, "expected at least one torch.load to check"
    assert all("weights_only=True" in args for _, args in calls), calls
