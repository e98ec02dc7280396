//! The vision actor: turns images into embeddings on the device it is given.
//!
//! The models this build runs are text-only, so it answers every image with a
//! clear "this model has no vision support" error instead of pretending: a
//! request with images is refused before it takes a decoding slot.

use embody_protocol::Image;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

pub(crate) struct VisionArgs {
    /// The loaded model's name, for messages.
    pub model: String,
    /// The loaded model's architecture.
    pub arch: String,
}

/// Why images cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum VisionError {
    /// The loaded model takes text only.
    #[error("the loaded model '{model}' ({arch}) has no vision support: send the request without images, or serve a vision-language model")]
    Unsupported { model: String, arch: String },
}

/// The vision actor.
pub(crate) struct VisionActor;

pub(crate) struct VisionState {
    model: String,
    arch: String,
}

pub(crate) enum VisionMsg {
    /// Prepare these images for a request.
    Encode {
        images: Vec<Image>,
        reply: RpcReplyPort<Result<(), VisionError>>,
    },
}

impl Actor for VisionActor {
    type Msg = VisionMsg;
    type State = VisionState;
    type Arguments = VisionArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: VisionArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(VisionState {
            model: args.model,
            arch: args.arch,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: VisionMsg,
        state: &mut VisionState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            VisionMsg::Encode { images, reply } => {
                tracing::debug!(images = images.len(), "images refused: text-only model");
                let _ = reply.send(Err(VisionError::Unsupported {
                    model: state.model.clone(),
                    arch: state.arch.clone(),
                }));
            }
        }
        Ok(())
    }
}
