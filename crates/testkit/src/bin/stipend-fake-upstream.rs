//! Runs the fake upstream on the address given (default 127.0.0.1:9000), for manual tests and
//! load runs: `stipend-fake-upstream 127.0.0.1:9000`.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".to_string());
    let listener = match tokio::net::TcpListener::bind(&address).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("cannot listen on {address}: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!("fake upstream on http://{address}/v1");
    match stipend_testkit::serve(listener).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fake upstream failed: {error}");
            ExitCode::FAILURE
        }
    }
}
