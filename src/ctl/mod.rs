//! `meshbridge ctl`: the admin API from the command line.
//!
//! [`args`] is the command line, [`client`] the one bounded HTTP call a command makes (which
//! call, the token, the errors), and [`render`] turns the answer — a view of
//! [`crate::admin::views`], the types the admin server builds — into aligned tables; `-o
//! json` prints the API's JSON itself. [`run`] is the thin IO shell joining them.

pub mod args;
pub mod client;
pub mod render;

pub use args::{CtlArgs, CtlCommand, DEFAULT_ADMIN, LOG_LEVELS, Output, parse_admin};
pub use client::{CONNECT_TIMEOUT, Call, CtlError, Method, TOTAL_TIMEOUT, call_for, url_for};

use client::Answer;
use render::pretty_json;

/// Runs `ctl`: one call to the admin API, its answer printed on stdout. Errors are one line
/// naming the URL (unreachable, non-2xx with the API's message and status, bad JSON).
pub async fn run(args: CtlArgs) -> anyhow::Result<()> {
    let call = call_for(&args.command, args.output);
    let answer = client::fetch(&args.admin, args.token_file.as_deref(), &call).await?;
    let text = output(&args, &call, answer)?;
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error worth a message.
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
    Ok(())
}

/// What `ctl` prints for `answer`: Envoy's text as fetched, the API's JSON re-indented
/// (`-o json`), or the command's table.
fn output(args: &CtlArgs, call: &Call, answer: Answer) -> Result<String, CtlError> {
    if !call.json {
        return Ok(ensure_newline(answer.body));
    }
    match (args.output, &args.command) {
        (Output::Json, _) => {
            answer.check_json()?;
            Ok(pretty_json(&answer.body))
        }
        // Printed as fetched.
        (Output::Table, CtlCommand::ConfigDump { .. }) => {
            answer.check_json()?;
            Ok(ensure_newline(answer.body))
        }
        (Output::Table, command) => {
            render::render(command, &answer.body, crate::sources::now_secs())
                .map_err(|e| answer.unreadable(e))
        }
    }
}

fn ensure_newline(mut s: String) -> String {
    if !s.is_empty() && !s.ends_with('\n') {
        s.push('\n');
    }
    s
}
