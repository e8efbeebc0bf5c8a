//! Serve a sparse RAM disk: `cargo run --example memserve -- 127.0.0.1:10809 [SIZE_MIB]`.
use std::sync::Arc;

use nbd_server::{Export, MemoryBackend, Server, ServerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let mib: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64);
    let server = Server::new(ServerConfig::default());
    server.add_export(
        Export::new("mem", Arc::new(MemoryBackend::new(mib << 20))).with_description("RAM disk"),
    )?;
    let l = server.serve(tokio::net::TcpListener::bind(&addr).await?)?;
    println!("serving nbd://{}/mem", l.local_addr());
    tokio::signal::ctrl_c().await?;
    server.shutdown().await?;
    Ok(())
}
