from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Node(_message.Message):
    __slots__ = ("id", "cluster", "services", "all_services", "build_version")
    ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    ALL_SERVICES_FIELD_NUMBER: _ClassVar[int]
    BUILD_VERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    cluster: str
    services: _containers.RepeatedScalarFieldContainer[str]
    all_services: bool
    build_version: str
    def __init__(self, id: _Optional[str] = ..., cluster: _Optional[str] = ..., services: _Optional[_Iterable[str]] = ..., all_services: _Optional[bool] = ..., build_version: _Optional[str] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("service", "destination", "mode", "fallback", "priority", "match_json", "upstream_protocol", "tunnel")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MATCH_JSON_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    TUNNEL_FIELD_NUMBER: _ClassVar[int]
    service: str
    destination: str
    mode: str
    fallback: str
    priority: int
    match_json: str
    upstream_protocol: str
    tunnel: str
    def __init__(self, service: _Optional[str] = ..., destination: _Optional[str] = ..., mode: _Optional[str] = ..., fallback: _Optional[str] = ..., priority: _Optional[int] = ..., match_json: _Optional[str] = ..., upstream_protocol: _Optional[str] = ..., tunnel: _Optional[str] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("id", "key", "owner", "labels", "created_at", "expires_at", "routes")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    key: str
    owner: str
    labels: _containers.ScalarMap[str, str]
    created_at: float
    expires_at: float
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, id: _Optional[str] = ..., key: _Optional[str] = ..., owner: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[float] = ..., expires_at: _Optional[float] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class Resource(_message.Message):
    __slots__ = ("name", "version", "session")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    session: Session
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class DiscoveryRequest(_message.Message):
    __slots__ = ("node", "version_info", "response_nonce", "error_detail")
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_INFO_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_NONCE_FIELD_NUMBER: _ClassVar[int]
    ERROR_DETAIL_FIELD_NUMBER: _ClassVar[int]
    node: Node
    version_info: str
    response_nonce: str
    error_detail: Status
    def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ..., version_info: _Optional[str] = ..., response_nonce: _Optional[str] = ..., error_detail: _Optional[_Union[Status, _Mapping]] = ...) -> None: ...

class DiscoveryResponse(_message.Message):
    __slots__ = ("version_info", "nonce", "resources", "control_plane_id")
    VERSION_INFO_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    CONTROL_PLANE_ID_FIELD_NUMBER: _ClassVar[int]
    version_info: str
    nonce: str
    resources: _containers.RepeatedCompositeFieldContainer[Resource]
    control_plane_id: str
    def __init__(self, version_info: _Optional[str] = ..., nonce: _Optional[str] = ..., resources: _Optional[_Iterable[_Union[Resource, _Mapping]]] = ..., control_plane_id: _Optional[str] = ...) -> None: ...

class DeltaDiscoveryRequest(_message.Message):
    __slots__ = ("node", "initial_resource_versions", "response_nonce", "error_detail")
    class InitialResourceVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_RESOURCE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_NONCE_FIELD_NUMBER: _ClassVar[int]
    ERROR_DETAIL_FIELD_NUMBER: _ClassVar[int]
    node: Node
    initial_resource_versions: _containers.ScalarMap[str, str]
    response_nonce: str
    error_detail: Status
    def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ..., initial_resource_versions: _Optional[_Mapping[str, str]] = ..., response_nonce: _Optional[str] = ..., error_detail: _Optional[_Union[Status, _Mapping]] = ...) -> None: ...

class DeltaDiscoveryResponse(_message.Message):
    __slots__ = ("system_version_info", "nonce", "resources", "removed_resources", "control_plane_id")
    SYSTEM_VERSION_INFO_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    REMOVED_RESOURCES_FIELD_NUMBER: _ClassVar[int]
    CONTROL_PLANE_ID_FIELD_NUMBER: _ClassVar[int]
    system_version_info: str
    nonce: str
    resources: _containers.RepeatedCompositeFieldContainer[Resource]
    removed_resources: _containers.RepeatedScalarFieldContainer[str]
    control_plane_id: str
    def __init__(self, system_version_info: _Optional[str] = ..., nonce: _Optional[str] = ..., resources: _Optional[_Iterable[_Union[Resource, _Mapping]]] = ..., removed_resources: _Optional[_Iterable[str]] = ..., control_plane_id: _Optional[str] = ...) -> None: ...
