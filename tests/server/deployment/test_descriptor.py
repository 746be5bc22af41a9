"""Deployment descriptors: the XYZ example, the schema gate, every semantic rule, templates and parameters."""
from __future__ import annotations

import os

import pytest

from dsmt.server.deployment.descriptor import (
    DEFAULT_RESTART, MAX_COMPONENTS, MAX_DESCRIPTOR_BYTES, Barrier, DescriptorError, Do, Parallel, Sequence,
    check_sliver_path, parse_descriptor, read_descriptor, resolve_parameters, substitute, template_names,
)
from dsmt.server.refusal import Refusal

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "xyz.xml")
SHA = "ab" * 32

PARAMS = '<parameters><parameter name="port" default="8080"/><parameter name="who" required="true"/></parameters>'
WEB = ('<component name="web"><package url="https://example.org/web.tar.gz" sha256="' + SHA + '" format="tar"/>'
       '<start><arg>python3</arg><arg>web.py</arg></start><health><tcp port="${port}"/></health></component>')


def doc(components: str = WEB, steps: str = '<do action="start" component="web"/>', params: str = PARAMS) -> bytes:
    return (f'<deployment xmlns="http://dsmt.org/ns/deployment"><application name="A" version="1"/>{params}'
            f'{components}<steps>{steps}</steps></deployment>').encode()


def refused(data: bytes, code: str, *fragments: str, **options) -> DescriptorError:
    with pytest.raises(DescriptorError) as caught:
        parse_descriptor(data, **options)
    error = caught.value
    assert error.code == code, str(error)
    for fragment in fragments:
        assert fragment in error.reason, error.reason
    return error


def component(name: str, body: str = "", start: bool = True) -> str:
    started = '<start><arg>run</arg></start>' if start else ""
    return f'<component name="{name}">{body}{started}</component>'


# -- the example ---------------------------------------------------------------------------------

def test_xyz_example_parses_into_the_model():
    descriptor = read_descriptor(FIXTURE)
    assert (descriptor.application.name, descriptor.application.version) == ("XYZ", "1.2.0")
    assert [p.name for p in descriptor.parameters] == ["port", "echo_port", "greeting", "node"]
    assert descriptor.parameter("node").required and descriptor.parameter("node").default is None
    echo, web = descriptor.components
    assert echo.package.dest == "xyz-echo" and echo.package.format == "tar"
    assert web.package.sha256 == web.package.sha256.lower() and web.package.dest == "apps/xyz-web"
    assert web.depends_on == ("xyz-echo",)
    assert web.start.argv == ("python3", "xyz_web.py", "--config", "xyz.conf")
    assert dict(web.start.env)["XYZ_NODE"] == "${node}"
    assert web.start.limits.memory_bytes == 134217728 and web.start.limits.open_files is None
    assert web.configs[0].mode == 0o640
    assert web.health.kind == "http" and web.health.timeout == 3.0
    assert echo.health.kind == "tcp" and echo.health.port == "${echo_port}" and echo.health.host == "127.0.0.1"
    assert echo.stop.grace == 5.0 and echo.restart == DEFAULT_RESTART
    parallel = descriptor.steps.steps[0]
    assert isinstance(parallel, Parallel) and len(parallel.branches) == 2
    assert parallel.branches[0].steps[1] == Barrier("installed")
    assert descriptor.steps.steps[1] == Do("start", "xyz-web")


def test_xyz_config_renders_with_parameters():
    descriptor = read_descriptor(FIXTURE)
    values = resolve_parameters(descriptor, {"node": "planetlab5.nbgisp.com", "port": "9000"})
    text = substitute(descriptor.component("xyz-web").configs[0].template, values)
    assert "# XYZ on planetlab5.nbgisp.com\nport = 9000\n" in text
    assert "echo = 127.0.0.1:7007" in text and "price = $5" in text


def test_descriptor_is_frozen():
    descriptor = read_descriptor(FIXTURE)
    with pytest.raises(AttributeError):
        descriptor.application.name = "other"


def test_error_is_a_refusal_naming_the_line():
    error = refused(doc(steps='<do action="start" component="nope"/>'), "unknown-component", "'nope'")
    assert isinstance(error, Refusal) and error.line == 1 and str(error).startswith("unknown-component: line 1:")


def test_unreadable_file():
    with pytest.raises(DescriptorError) as caught:
        read_descriptor("missing.xml")
    assert caught.value.code == "io"


# -- safe XML and the schema ---------------------------------------------------------------------

@pytest.mark.parametrize("data, fragment", [
    (b'<!DOCTYPE d [<!ENTITY x "y">]><deployment/>', "DOCTYPE"),
    (b"<deployment", "not well-formed"),
    (b"", "not well-formed"),
    (b" " * (MAX_DESCRIPTOR_BYTES + 1), "over the limit"),
    (b"<a>" * 40 + b"</a>" * 40, "deeper"),
])
def test_unsafe_xml(data, fragment):
    refused(data, "unsafe-xml", fragment)


def test_wrong_root_or_namespace():
    refused(b"<deployment/>", "schema", "namespace http://dsmt.org/ns/deployment")


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d.replace(b'version="1"', b''), "version"),
    (lambda d: d.replace(b'format="tar"', b'format="rpm"'), "format"),
    (lambda d: d.replace(SHA.encode(), b"abc"), "sha256"),
    (lambda d: d.replace(b"https://example.org", b"ftp://example.org"), "url"),
    (lambda d: d.replace(b"<arg>python3</arg><arg>web.py</arg>", b""), "start"),
    (lambda d: d.replace(b'<component name="web">', b'<component name="Web">'), "name"),
    (lambda d: d.replace(b"</deployment>", b"<extra/></deployment>"), "extra"),
    (lambda d: d.replace(b'action="start"', b'action="Start!"'), "action"),
])
def test_schema_violations_name_line_and_element(mutate, fragment):
    error = refused(mutate(doc()), "schema", fragment)
    assert error.line == 1 and "{http" not in error.reason


def test_schema_error_line_is_the_offending_line():
    data = doc().replace(b"<steps>", b"\n\n<steps>").replace(b'<do action', b'<do bogus="1" action')
    assert refused(data, "schema", "bogus").line == 3


# -- semantic rules ------------------------------------------------------------------------------

def test_duplicate_component():
    refused(doc(WEB + WEB), "duplicate", "component name='web'", "declared twice")


def test_duplicate_parameter():
    refused(doc(params='<parameters><parameter name="p" default=""/><parameter name="p" default="x"/></parameters>'),
            "duplicate", "parameter name='p'")


def test_duplicate_env():
    body = '<start><arg>run</arg><env name="X" value="1"/><env name="X" value="2"/></start>'
    refused(doc(f'<component name="web">{body}</component>'), "duplicate", "'X' is set twice")


def test_duplicate_config_path_across_components():
    a = component("a", '<config path="etc/x.conf">a</config>')
    b = component("b", '<config path="etc/x.conf">b</config>')
    refused(doc(a + b, '<do action="start" component="a"/>'), "duplicate", "'etc/x.conf'", "component 'a' too")


@pytest.mark.parametrize("steps, code, fragment", [
    ('<do action="start" component="ghost"/>', "unknown-component", "'ghost'"),
    ('<do action="deploy" component="web"/>', "unknown-action", "'deploy'"),
    ('<do action="configure" component="web"/>', "unsupported-action", "<config>"),
])
def test_step_references(steps, code, fragment):
    refused(doc(steps=steps), code, fragment)


def test_plugin_actions_are_accepted_when_known():
    descriptor = parse_descriptor(doc(steps='<do action="notify" component="web"/>'), actions={"notify"})
    assert descriptor.steps == Do("notify", "web")


def test_actions_a_component_cannot_do():
    bare = component("bare", start=False)
    for action, missing in [("start", "<start>"), ("stop", "nothing to stop"), ("check", "<health>"),
                            ("install", "<package> or <install>")]:
        refused(doc(bare, f'<do action="{action}" component="bare"/>'), "unsupported-action", missing)
    parse_descriptor(doc(bare, '<do action="uninstall" component="bare"/>'))


def test_unknown_dependency():
    refused(doc(component("a", '<dependsOn component="b"/>'), '<do action="start" component="a"/>'),
            "unknown-component", "depends on 'b'")


def test_self_dependency():
    refused(doc(component("a", '<dependsOn component="a"/>'), '<do action="start" component="a"/>'),
            "cycle", "'a' depends on itself")


def test_dependency_cycle_is_spelt_out():
    parts = (component("a", '<dependsOn component="b"/>') + component("b", '<dependsOn component="c"/>')
             + component("c", '<dependsOn component="a"/>') + component("d", '<dependsOn component="a"/>'))
    error = refused(doc(parts, '<do action="start" component="a"/>'), "cycle", "a -> b -> c -> a")
    assert error.line == 1


def test_diamond_dependencies_are_fine():
    parts = (component("a", '<dependsOn component="b"/><dependsOn component="c"/>')
             + component("b", '<dependsOn component="d"/>') + component("c", '<dependsOn component="d"/>')
             + component("d"))
    assert parse_descriptor(doc(parts, '<do action="start" component="a"/>')).component("a").depends_on == ("b", "c")


@pytest.mark.parametrize("path, fragment", [
    ("/etc/passwd", "absolute"),
    ("../x", "'..'"),
    ("a/../../x", "'..'"),
    ("a//b", "empty or '.'"),
    ("./a", "empty or '.'"),
    ("a\\b", "backslash"),
    ("a/" + "x" * 256, "over 255 bytes"),
    ("a&#9;b", "control"),  # a character reference survives attribute normalisation
])
def test_config_paths_stay_in_the_sliver(path, fragment):
    refused(doc(component("a", f'<config path="{path}">x</config>'), '<do action="configure" component="a"/>'),
            "path-escape", fragment)


def test_package_dest_and_cwd_are_checked():
    refused(doc(WEB.replace('format="tar"', 'format="tar" dest="../up"')), "path-escape", "<package dest>")
    refused(doc(WEB.replace("<start>", '<start cwd="/tmp">')), "path-escape", "cwd")


def test_undefined_parameter():
    refused(doc(WEB.replace("web.py", "${missing}")), "undefined-parameter", "${missing}", "<start> <arg>")
    refused(doc(WEB.replace('port="${port}"', 'port="${nope}"')), "undefined-parameter", "<tcp port>")
    refused(doc(component("a", '<config path="c">x=${y}</config>'), '<do action="start" component="a"/>'),
            "undefined-parameter", "'c'")


def test_malformed_template():
    refused(doc(WEB.replace("web.py", "${port")), "bad-template", "not closed")
    refused(doc(WEB.replace("web.py", "${1x}")), "bad-template", "not a parameter reference")


def test_empty_argv0():
    refused(doc(WEB.replace("<arg>python3</arg>", "<arg>  </arg>")), "empty-argv", "program")


@pytest.mark.parametrize("params, fragment", [
    ('<parameter name="p" default="1" required="true"/>', "required and has a default"),
    ('<parameter name="p"/>', "has no default"),
])
def test_parameter_declarations(params, fragment):
    refused(doc(params=f"<parameters>{params}</parameters>"), "parameter", fragment)


@pytest.mark.parametrize("old, new, fragment", [
    ("<health>", '<health interval="1" timeout="2">', "longer than the interval"),
    ("<health>", '<health retries="0">', "retries"),
    ("<health>", '<health interval="0">', "above 0"),
    ('port="${port}"', 'port="70000"', "not a port number"),
    ('<tcp port="${port}"/>', '<http url="ftp://x/${port}"/>', "not an http"),
    ("</health>", '</health><restart backoffInitial="9" backoffMax="2"/>', "above backoffMax"),
    ("</health>", '</health><restart backoffInitial="0"/>', "tight loop"),
])
def test_values_out_of_range(old, new, fragment):
    refused(doc(WEB.replace(old, new)), "value", fragment)


def test_component_limit():
    parts = "".join(component(f"c{i}") for i in range(MAX_COMPONENTS + 1))
    refused(doc(parts, '<do action="start" component="c0"/>'), "limit", str(MAX_COMPONENTS))


# -- composition and barriers --------------------------------------------------------------------

def two(name: str = "a") -> str:
    return component(name) + component(name + "2")


def test_barrier_outside_parallel():
    refused(doc(steps='<sequence><do action="start" component="web"/><barrier name="b"/></sequence>'),
            "barrier", "not inside a branch")


def test_barrier_directly_in_parallel():
    refused(doc(steps='<parallel><barrier name="b"/><do action="start" component="web"/></parallel>'),
            "barrier", "directly a branch")


def test_barrier_in_one_branch_only():
    steps = ('<parallel><sequence><do action="start" component="web"/><barrier name="b"/></sequence>'
             '<do action="check" component="web"/></parallel>')
    refused(doc(steps=steps), "barrier", "only one branch")


def test_barrier_twice_in_a_branch():
    steps = ('<parallel><sequence><barrier name="b"/><barrier name="b"/></sequence>'
             '<sequence><barrier name="b"/></sequence></parallel>')
    refused(doc(steps=steps), "barrier", "twice in one branch")


def test_barriers_in_opposite_orders_deadlock():
    steps = ('<parallel><sequence><barrier name="x"/><barrier name="y"/></sequence>'
             '<sequence><barrier name="y"/><barrier name="x"/></sequence></parallel>')
    refused(doc(steps=steps), "barrier", "deadlock", "x -> y -> x")


def test_nested_parallel_scopes_its_barriers():
    inner = ('<parallel><sequence><do action="start" component="web"/><barrier name="b"/></sequence>'
             '<sequence><barrier name="b"/><do action="check" component="web"/></sequence></parallel>')
    steps = f'<parallel><sequence>{inner}</sequence><do action="stop" component="web"/></parallel>'
    descriptor = parse_descriptor(doc(steps=steps))
    assert isinstance(descriptor.steps, Parallel) and isinstance(descriptor.steps.branches[0], Sequence)
    # the same barrier name split across the outer parallel's branches via the inner one is still one-sided
    bad = (f'<parallel><sequence>{inner}</sequence><sequence><barrier name="b"/></sequence></parallel>')
    refused(doc(steps=bad), "barrier", "only one branch")


# -- templates, paths and parameters -------------------------------------------------------------

def test_substitute():
    assert substitute("a ${x} $$ $y ${x}$", {"x": "1"}) == "a 1 $ $y 1$"
    assert template_names("${b}${a}${b}") == ("b", "a")
    with pytest.raises(KeyError):
        substitute("${x}", {})
    with pytest.raises(ValueError):
        substitute("${" + "x" * 200 + "}", {})


def test_substitution_does_not_rescan_values():
    assert substitute("${x}", {"x": "${y}"}) == "${y}"


def test_check_sliver_path_accepts_canonical_paths():
    assert check_sliver_path("apps/xyz/etc/x.conf") == "apps/xyz/etc/x.conf"
    assert check_sliver_path("..hidden/a..b") == "..hidden/a..b"


def test_resolve_parameters():
    descriptor = parse_descriptor(doc())
    assert resolve_parameters(descriptor, {"who": "me"}) == {"port": "8080", "who": "me"}
    for given, fragment in [({}, "required"), ({"who": "x", "other": "1"}, "not a parameter"),
                            ({"who": "a\x00b"}, "NUL"), ({"who": "x" * (64 * 1024 + 1)}, "over")]:
        with pytest.raises(DescriptorError) as caught:
            resolve_parameters(descriptor, given)
        assert caught.value.code == "parameter" and fragment in caught.value.reason
