//! An SDK client for crash tests: runs `mls_ds_tests::crashing::client_loop`
//! until the test kills it. Arguments: NAME DATA_DIR URL_FILE SEED
//! INCARNATION ABORT (see `ChildSpec`).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec = mls_ds_tests::crashing::ChildSpec::from_args(&args);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(mls_ds_tests::crashing::client_loop(spec));
}
