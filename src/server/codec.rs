//! The protobuf codec of every gRPC service: prost's, except that a request that is not valid
//! protobuf is the client's fault, answered INVALID_ARGUMENT with the `MALFORMED` code rather
//! than tonic's INTERNAL. Generated service code names it (`build.rs`, `codec_path`). Runs on
//! the core serving the connection.

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::wire::proto::ErrorCode;

/// prost's codec with client-fault decode errors.
#[derive(Debug, Clone)]
pub struct ApiCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for ApiCodec<T, U> {
    fn default() -> Self {
        ApiCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for ApiCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ApiDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ApiDecoder(ProstDecoder::default())
    }
}

/// Decodes with prost; a decode error becomes `MALFORMED` (INVALID_ARGUMENT).
#[derive(Debug)]
pub struct ApiDecoder<U>(ProstDecoder<U>);

impl<U> Decoder for ApiDecoder<U>
where
    U: prost::Message + Default + Send + 'static,
{
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|error| {
            super::status::status(
                ErrorCode::Malformed,
                format!("the request is not a valid protobuf message: {}", error.message()),
            )
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
