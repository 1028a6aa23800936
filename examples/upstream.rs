//! Demo upstream that records requests and prints one line per request.
//!
//! ```text
//! cargo run --example upstream -- --port 8081 --delay-ms 0 --status 201 --fail-every 0
//! ```

#[path = "support/upstream.rs"]
mod upstream;

use std::process::ExitCode;
use std::time::Duration;

use upstream::{Behaviour, Upstream};

const USAGE: &str = "\
usage: upstream [OPTIONS]

Serves HTTP/1.1 and h2c (prior knowledge) on 127.0.0.1 until interrupted.

options:
  --port PORT         TCP port to listen on; 0 lets the OS choose (default 8081)
  --status CODE       response status (default 200)
  --delay-ms MS       delay before each response, in milliseconds (default 0)
  --fail-every N      answer every Nth request with 503; 0 disables (default 0)
  --body TEXT         response body (default empty)
  --reset             close the connection or reset the stream without a response
  -h, --help          print this help";

struct Args {
    port: u16,
    behaviour: Behaviour,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut parsed = Args {
        port: 8081,
        behaviour: Behaviour::default(),
    };
    while let Some(flag) = args.next() {
        let behaviour = &mut parsed.behaviour;
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--reset" => behaviour.reset = true,
            "--port" => parsed.port = parse_value(&flag, args.next())?,
            "--status" => behaviour.status = parse_value(&flag, args.next())?,
            "--delay-ms" => {
                behaviour.delay = Duration::from_millis(parse_value(&flag, args.next())?)
            }
            "--fail-every" => behaviour.fail_every = parse_value(&flag, args.next())?,
            "--body" => {
                let text: String = parse_value(&flag, args.next())?;
                behaviour.body = text.into();
            }
            _ => return Err(format!("unknown option {flag:?}")),
        }
    }
    Ok(Some(parsed))
}

fn parse_value<T: std::str::FromStr>(flag: &str, value: Option<String>) -> Result<T, String> {
    let value = value.ok_or_else(|| format!("missing value for {flag}"))?;
    value
        .parse()
        .map_err(|_| format!("invalid value {value:?} for {flag}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("error: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };

    let upstream = match Upstream::start_on(args.port, args.behaviour).await {
        Ok(upstream) => upstream,
        Err(error) => {
            eprintln!(
                "error: starting the upstream on 127.0.0.1:{} failed: {error}",
                args.port
            );
            return ExitCode::FAILURE;
        }
    };
    println!("listening on 127.0.0.1:{}", upstream.port());

    let mut printed = 0;
    loop {
        // The timeout only bounds each wait, because the demo serves until interrupted.
        if upstream
            .wait_for_count(printed + 1, Duration::from_secs(3600))
            .await
            .is_err()
        {
            continue;
        }
        let requests = upstream.requests();
        for request in &requests[printed..] {
            println!(
                "{:?} {} {} ({} body bytes)",
                request.version,
                request.method,
                request.path,
                request.body.len()
            );
        }
        printed = requests.len();
    }
}
