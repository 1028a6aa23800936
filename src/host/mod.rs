//! The proxy-wasm adapter: the only code that calls the SDK. It turns host
//! callbacks into calls on [`crate::core`] and host statuses into log lines
//! and counted outcomes.
//!
//! Ownership of a side call, from match to outcome:
//! 1. The request's [`stream::Stream`] matches, samples and copies the body
//!    as it streams past, then moves each finished side call by value into
//!    the worker's queue ([`worker::Worker`]) and arms the root's timer.
//! 2. The root context ([`root::Root`]) drains the queue in `on_tick` and
//!    dispatches the calls itself. The SDK routes a call's response to the
//!    context that dispatched it and drops it once that context is gone, so
//!    a call dispatched by the request's own context would lose its outcome
//!    whenever it finished after the client's response.
//! 3. The root receives the response, classifies it and records it.

mod abi;
mod body;
mod dispatch;
mod fanout;
mod metrics;
mod response;
mod root;
mod stream;
mod time;
mod worker;

use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::Root::new(context_id))
    });
}}
