//! A flowhost plugin built against a future, incompatible contract version
//! (`flowhost:plugin@0.4.0`): must be rejected at load with both versions named.
wit_bindgen::generate!({ path: "wit", world: "plugin" });
use exports::flowhost::plugin::endpoint::Guest;
use flowhost::plugin::types::*;
struct Future;
impl Guest for Future {
    fn describe() -> Manifest {
        Manifest {
            name: "future".into(),
            version: "9.0.0".into(),
            route: "/future".into(),
            summary: "from the future".into(),
            request_schema: "{}".into(),
            response_media_types: vec![],
            analytics_prefix: "future".into(),
            node_classes: vec![],
            models: vec![],
        }
    }
    fn build(_r: Request) -> Result<Job, BuildError> {
        Err(BuildError::Internal("never".into()))
    }
    fn explain_failure(_f: ExecutionFailure) -> Option<UserError> {
        None
    }
}
export!(Future);
