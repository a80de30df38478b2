"""Local stand-ins for the two repositories Bazel 4.2.3 fetches even offline.

`@rules_cc` is loaded by `@bazel_tools//tools/cpp`; `@remote_coverage_tools` is an
implicit attribute of every test rule. Neither is needed for what we build, so
each is a tiny generated repository (no download, no nested WORKSPACE in git).
`bazel coverage` does not work with these stubs.
"""

_RULES_CC_DEFS = '''\
"""Forwards the rules_cc API to the native rules (local stub)."""

def cc_binary(**kwargs):
    native.cc_binary(**kwargs)

def cc_import(**kwargs):
    native.cc_import(**kwargs)

def cc_library(**kwargs):
    native.cc_library(**kwargs)

def cc_proto_library(**kwargs):
    native.cc_proto_library(**kwargs)

def cc_test(**kwargs):
    native.cc_test(**kwargs)

def cc_toolchain(**kwargs):
    native.cc_toolchain(**kwargs)

def cc_toolchain_suite(**kwargs):
    native.cc_toolchain_suite(**kwargs)

def fdo_prefetch_hints(**kwargs):
    native.fdo_prefetch_hints(**kwargs)

def fdo_profile(**kwargs):
    native.fdo_profile(**kwargs)

def objc_import(**kwargs):
    native.objc_import(**kwargs)

def objc_library(**kwargs):
    native.objc_library(**kwargs)
'''

_RULES_CC_BUILD = '''\
package(default_visibility = ["//visibility:public"])

alias(
    name = "toolchain_type",
    actual = "@bazel_tools//tools/cpp:toolchain_type",
)
'''

def _rules_cc_stub_impl(ctx):
    ctx.file("WORKSPACE", 'workspace(name = "rules_cc")\n')
    ctx.file("BUILD", "")
    ctx.file("cc/BUILD", _RULES_CC_BUILD)
    ctx.file("cc/defs.bzl", _RULES_CC_DEFS)

rules_cc_stub = repository_rule(
    implementation = _rules_cc_stub_impl,
    doc = "A rules_cc whose cc/defs.bzl forwards to the native C++ rules.",
)

_COVERAGE_BUILD = '''\
package(default_visibility = ["//visibility:public"])

# Never run: `bazel coverage` is not supported with this stub.
sh_binary(
    name = "coverage_report_generator",
    srcs = ["unsupported.sh"],
)

sh_binary(
    name = "lcov_merger",
    srcs = ["unsupported.sh"],
)

filegroup(
    name = "coverage_output_generator",
    srcs = ["unsupported.sh"],
)
'''

def _remote_coverage_tools_stub_impl(ctx):
    ctx.file("WORKSPACE", 'workspace(name = "remote_coverage_tools")\n')
    ctx.file(
        "unsupported.sh",
        "#!/bin/sh\necho 'coverage is not supported by the offline stub' >&2\nexit 1\n",
        executable = True,
    )
    ctx.file("BUILD", _COVERAGE_BUILD)

remote_coverage_tools_stub = repository_rule(
    implementation = _remote_coverage_tools_stub_impl,
    doc = "Satisfies the implicit coverage attributes of test rules (no coverage).",
)
