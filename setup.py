"""Build hook: generate the gRPC stubs from proto/ before packaging.

The stubs are never committed; they are written to latentserve/v1/ (git-ignored)
on every build, editable or not, so the wheel and the source tree agree.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()


def generate_stubs() -> None:
    """Run grpc_tools.protoc over proto/latentserve/v1/*.proto into latentserve/v1/."""
    import shutil

    from grpc_tools import protoc

    out = ROOT / "latentserve" / "v1"
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted((ROOT / "proto" / "latentserve" / "v1").glob("*.proto"))
    if not protos:
        raise RuntimeError("no .proto files under proto/latentserve/v1")
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{ROOT / 'proto'}", f"-I{include}",
            f"--python_out={ROOT}", f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}"]
    args += [str(p) for p in protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(map(str, protos)))
    (out / "__init__.py").write_text(
        '"""Generated gRPC stubs (built from proto/, never edited)."""\n')
    for p in protos:  # ship the contract beside its stubs, for reflection and other languages
        shutil.copy(p, out / p.name)


class BuildWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


# Metadata generation already checks that latentserve/v1 exists, so generate first.
generate_stubs()
setup(cmdclass={"build_py": BuildWithStubs})
