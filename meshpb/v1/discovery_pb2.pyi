from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IssueRequest(_message.Message):
    __slots__ = ("csr_pem", "node_id")
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    csr_pem: str
    node_id: str
    def __init__(self, csr_pem: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class IssueResponse(_message.Message):
    __slots__ = ("cert_pem", "bundle_pem")
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    cert_pem: str
    bundle_pem: str
    def __init__(self, cert_pem: _Optional[str] = ..., bundle_pem: _Optional[str] = ...) -> None: ...

class DiscoveryRequest(_message.Message):
    __slots__ = ("hello", "ack", "ping")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    ack: Ack
    ping: Ping
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("node_id", "service", "address", "port", "labels", "last_version", "known_instances", "known_endpoints")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LAST_VERSION_FIELD_NUMBER: _ClassVar[int]
    KNOWN_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    KNOWN_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    service: str
    address: str
    port: int
    labels: _containers.ScalarMap[str, str]
    last_version: str
    known_instances: _containers.RepeatedScalarFieldContainer[str]
    known_endpoints: _containers.RepeatedCompositeFieldContainer[KnownEndpoint]
    def __init__(self, node_id: _Optional[str] = ..., service: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., last_version: _Optional[str] = ..., known_instances: _Optional[_Iterable[str]] = ..., known_endpoints: _Optional[_Iterable[_Union[KnownEndpoint, _Mapping]]] = ...) -> None: ...

class KnownEndpoint(_message.Message):
    __slots__ = ("service", "address", "port")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    service: str
    address: str
    port: int
    def __init__(self, service: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("version", "nonce", "accepted", "error_detail")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_DETAIL_FIELD_NUMBER: _ClassVar[int]
    version: str
    nonce: str
    accepted: bool
    error_detail: str
    def __init__(self, version: _Optional[str] = ..., nonce: _Optional[str] = ..., accepted: _Optional[bool] = ..., error_detail: _Optional[str] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("version", "nonce", "services", "pong")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    version: str
    nonce: str
    services: _containers.RepeatedCompositeFieldContainer[Service]
    pong: int
    def __init__(self, version: _Optional[str] = ..., nonce: _Optional[str] = ..., services: _Optional[_Iterable[_Union[Service, _Mapping]]] = ..., pong: _Optional[int] = ...) -> None: ...

class Service(_message.Message):
    __slots__ = ("name", "endpoints", "policy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    policy: Policy
    def __init__(self, name: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("address", "port", "instance", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    instance: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, address: _Optional[str] = ..., port: _Optional[int] = ..., instance: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("timeout_ms", "retries", "lb", "authorization")
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    LB_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZATION_FIELD_NUMBER: _ClassVar[int]
    timeout_ms: int
    retries: int
    lb: str
    authorization: Authorization
    def __init__(self, timeout_ms: _Optional[int] = ..., retries: _Optional[int] = ..., lb: _Optional[str] = ..., authorization: _Optional[_Union[Authorization, _Mapping]] = ...) -> None: ...

class Authorization(_message.Message):
    __slots__ = ("enforced", "allowed_callers")
    ENFORCED_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_CALLERS_FIELD_NUMBER: _ClassVar[int]
    enforced: bool
    allowed_callers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, enforced: _Optional[bool] = ..., allowed_callers: _Optional[_Iterable[str]] = ...) -> None: ...
