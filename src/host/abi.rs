//! Host calls that can fail at run time on a healthy proxy, called through
//! the raw proxy-wasm ABI so that every status comes back as a value.
//!
//! The SDK's wrappers for these calls panic on any status they do not
//! expect, and a panic kills the worker's VM. Fan-out resumes or replaces a
//! held response from the root context, after the client may have gone, and
//! a shared queue may be refused, so these calls must be allowed to fail.
#![allow(unsafe_code, clashing_extern_declarations)]

/// A proxy-wasm status code other than `Ok` (0); for example 1 is
/// `NotFound` and 2 is `BadArgument`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError(pub u32);

const STREAM_HTTP_RESPONSE: u32 = 1;
const MAP_HTTP_REQUEST_HEADERS: u32 = 0;
const MAP_HTTP_RESPONSE_HEADERS: u32 = 2;

// The SDK declares the same imports with enum types of the same width.
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
}

fn check(status: u32) -> Result<(), HostError> {
    if status == 0 {
        Ok(())
    } else {
        Err(HostError(status))
    }
}

/// Makes later host calls act on `context_id`. Fails with `BadArgument`
/// when that context no longer exists.
pub fn set_effective_context(context_id: u32) -> Result<(), HostError> {
    // SAFETY: the call takes a plain integer.
    check(unsafe { proxy_set_effective_context(context_id) })
}

/// Lets a held response continue to the client.
pub fn resume_http_response() -> Result<(), HostError> {
    // SAFETY: the call takes a plain integer.
    check(unsafe { proxy_continue_stream(STREAM_HTTP_RESPONSE) })
}

/// Sets a response header, replacing any values it had.
pub fn set_response_header(name: &str, value: &[u8]) -> Result<(), HostError> {
    // SAFETY: both pointers are valid for the given lengths for the whole
    // call, and the host copies the bytes.
    check(unsafe {
        proxy_replace_header_map_value(
            MAP_HTTP_RESPONSE_HEADERS,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Removes every value of a request header.
pub fn remove_request_header(name: &str) -> Result<(), HostError> {
    // SAFETY: `name` is valid for its length for the whole call.
    check(unsafe {
        proxy_remove_header_map_value(MAP_HTTP_REQUEST_HEADERS, name.as_ptr(), name.len())
    })
}

/// Replaces the response with a local reply.
pub fn send_http_response(
    status: u32,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> Result<(), HostError> {
    let serialized = serialize_headers(headers);
    let details = b"mesh_fanout_failed";
    // SAFETY: every pointer is valid for its length for the whole call, and
    // the host copies what it needs.
    check(unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            serialized.as_ptr(),
            serialized.len(),
            -1,
        )
    })
}

/// Encodes a header map as the proxy-wasm ABI expects: the pair count,
/// then each name and value length, then each name and value followed by a
/// NUL byte, all lengths as little-endian u32.
fn serialize_headers(headers: &[(&str, &[u8])]) -> Vec<u8> {
    let size = 4 + headers
        .iter()
        .map(|(n, v)| 10 + n.len() + v.len())
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&len_u32(headers.len()).to_le_bytes());
    for (name, value) in headers {
        out.extend_from_slice(&len_u32(name.len()).to_le_bytes());
        out.extend_from_slice(&len_u32(value.len()).to_le_bytes());
    }
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    out
}

/// Header lengths are bounded by Envoy's header limits, far below 4 GiB.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_done() -> u32;
    fn proxy_register_shared_queue(
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
}

/// Registers a shared queue owned by the calling root context and returns
/// its id; the host calls that root's `on_queue_ready` after each enqueue.
pub fn register_shared_queue(name: &str) -> Result<u32, HostError> {
    let mut id: u32 = 0;
    // SAFETY: `name` is valid for its length and `id` for a u32 write for
    // the whole call.
    check(unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

/// Tells the host that a root context which returned `false` from
/// `on_done` has finished its work and can be deleted.
pub fn done() -> Result<(), HostError> {
    // SAFETY: the call takes no arguments.
    check(unsafe { proxy_done() })
}
