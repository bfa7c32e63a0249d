"""Turns a .proto file into a cc_library through the system protoc.

Bazel 4's cc_proto_library needs the protobuf source repository, which cannot be fetched
offline, so this macro runs /usr/bin/protoc in a genrule instead.
"""

def synod_cc_proto(name, src, deps = [], visibility = None):
    """Declares cc_library `name` from `src` (one .proto in this package).

    Args:
      name: the cc_library to declare.
      src: the .proto file, relative to this package.
      deps: synod_cc_proto targets whose .proto files `src` imports.
      visibility: of the cc_library.
    """
    base = src[:-len(".proto")]
    native.genrule(
        name = name + "_protoc",
        srcs = [src] + [d + "_srcs" for d in deps],
        outs = [base + ".pb.h", base + ".pb.cc"],
        cmd = "protoc --proto_path=. --proto_path=/usr/include --cpp_out=$(GENDIR) $(location %s)" % src,
    )
    native.filegroup(
        name = name + "_srcs",
        srcs = [src] + [d + "_srcs" for d in deps],
        visibility = visibility,
    )
    native.cc_library(
        name = name,
        srcs = [base + ".pb.cc"],
        hdrs = [base + ".pb.h"],
        copts = ["-w"],
        deps = ["//third_party:protobuf"] + deps,
        visibility = visibility,
    )
