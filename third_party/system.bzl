"""Glue for libraries installed by Debian packages (headers in /usr/include)."""

def system_library(name, libs, deps = [], linkopts = []):
    """A cc_library that links the named system libraries (-l<lib> each).

    Args:
      name: target name.
      libs: library names without the "lib" prefix, in link order.
      deps: other system_library targets these libraries need after them.
      linkopts: extra linker flags.
    """
    native.cc_library(
        name = name,
        linkopts = ["-l" + lib for lib in libs] + linkopts,
        deps = deps,
    )
