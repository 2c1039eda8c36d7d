//! `echo-server`: echoes every byte back until EOF, on each of its ports.

use tokio::{io::AsyncWriteExt, net::TcpStream, task::JoinSet};

use crate::connection::{PortSpec, flatten, listen_dual_stack};

#[derive(clap::Args)]
pub struct EchoServerArgs {
    /// Ports: `7000`, `7000,7001` or `7100-7119`; repeatable.
    #[arg(long, value_delimiter = ',', required = true)]
    ports: Vec<PortSpec>,
}

pub async fn run(args: &EchoServerArgs) -> anyhow::Result<()> {
    let ports = flatten(&args.ports);
    let mut accepters = JoinSet::new();
    for &port in &ports {
        let listener = listen_dual_stack(port)?;
        accepters.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(echo_connection(stream));
                    }
                    Err(error) => eprintln!("echo-server: accept on {port}: {error}"),
                }
            }
        });
    }
    eprintln!("echo-server: listening on [::] ports {ports:?}");
    while accepters.join_next().await.is_some() {}
    Ok(())
}

pub(crate) async fn echo_connection(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.split();
    // Echo until the client's EOF, then close our side too.
    let _ = tokio::io::copy(&mut reader, &mut writer).await;
    let _ = writer.shutdown().await;
}
