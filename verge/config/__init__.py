"""Declarative configuration: one validated model for the YAML file and the control-plane bundle.

Config is data. An operator writes a YAML file; the control plane pushes the same structure
as JSON (``Config.model_dump(mode="json")`` round-trips through ``Config.model_validate``).
Both go through the pydantic models of this package, so a typo or a wrong value is rejected
before it can reach a running node, and the message says where: ``verge.yaml:12:7:
services[0].rules[1].ttl: invalid duration 'abc' ...``.

The models also answer the two per-request questions cheaply: which service serves a Host
(``Config.service_for_host``, a dict lookup) and which rule applies to a path
(``Service.match_rule``, with globs compiled once). From verge the package imports only
verge.protect.settings (the protection block of a service).

The modules, from the bottom up (import the names from ``verge.config``, as before the split):

- bounds: the table of MAX_* limits every model and the control-plane API share
- units: sizes and durations ("64MiB", "1h30m"), ByteSize, Duration and the like
- base: the Model base, ``conflict`` errors, bounded text, host names, slugs, globs
- serving, origins, rules, service, tls, stream, compute: the sections
- model: ``Config``, the whole file, and its Host -> service index
- loader: YAML -> model with file:line errors (``load_config``, ``load_model_file``, ...)
- router: the request router's own file (``RouterConfig``, ``verge router --config``), built
  from the same pieces; import it from ``verge.config.router``
"""

from verge.config.base import (
    FilePath,
    HeaderName,
    HeaderValue,
    HostText,
    Label,
    Model,
    Name,
    Pem,
    Secret,
    Slug,
    Text,
    Url,
    UrlPath,
    config_host,
    conflict,
)
from verge.config.bounds import *  # noqa: F403 (the MAX_*/MIN_* table and KiB ... PiB)
from verge.config.compute import EdgeFunction, FunctionEnv, IngestRoute
from verge.config.loader import (
    ConfigError,
    ConfigIssue,
    Loc,
    M,
    config_for_origin,
    config_from_data,
    format_path,
    load_config,
    load_model_file,
    parse_config,
)
from verge.config.model import Config
from verge.config.origins import HealthCheck, OriginSpec, StatusPattern
from verge.config.rules import HeaderRules, Redirect, Rule, SignedUrls
from verge.config.service import Hsts, Service
from verge.config.serving import CacheSettings, Compression, Limits, OriginTimeouts
from verge.config.stream import Rendition, StreamApp, StreamSettings, WebRtcSettings
from verge.config.tls import Certificate, TlsSettings
from verge.config.units import (
    ByteSize,
    Duration,
    HealthInterval,
    PositiveDuration,
    RequestHeadSize,
    parse_bytes,
    parse_duration,
)

__all__ = [
    "ByteSize",
    "CacheSettings",
    "Certificate",
    "Compression",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "Duration",
    "EdgeFunction",
    "FilePath",
    "FunctionEnv",
    "HeaderName",
    "HeaderRules",
    "HeaderValue",
    "HealthCheck",
    "HealthInterval",
    "HostText",
    "Hsts",
    "IngestRoute",
    "Label",
    "Limits",
    "Loc",
    "M",
    "Model",
    "Name",
    "OriginSpec",
    "OriginTimeouts",
    "Pem",
    "PositiveDuration",
    "Redirect",
    "Rendition",
    "RequestHeadSize",
    "Rule",
    "Secret",
    "Service",
    "SignedUrls",
    "Slug",
    "StatusPattern",
    "StreamApp",
    "StreamSettings",
    "Text",
    "TlsSettings",
    "Url",
    "UrlPath",
    "WebRtcSettings",
    "config_for_origin",
    "config_from_data",
    "config_host",
    "conflict",
    "format_path",
    "load_config",
    "load_model_file",
    "parse_bytes",
    "parse_config",
    "parse_duration",
]
