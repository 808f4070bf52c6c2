//! The gRPC service end to end, in process, on the built-in default model and real
//! av-digits pairs: Predict, Fuse, GetModelInfo, batch invariance, and every kind of
//! bad input answered with INVALID_ARGUMENT naming the field.

mod common;

use common::{max_abs_diff, pairs, sample, serve_config, TestServer};
use fusion_serve::proto;
use tonic::Code;

fn tensor(shape: &[u32], values: Vec<f32>) -> proto::Tensor {
    proto::Tensor {
        shape: shape.to_vec(),
        values,
    }
}

fn image_tensor(shape: &[u32], values: Vec<f32>) -> Option<proto::Image> {
    Some(proto::Image {
        data: Some(proto::image::Data::Tensor(tensor(shape, values))),
    })
}

#[tokio::test]
async fn predict_fuse_and_info_on_real_pairs() {
    let server = TestServer::start(serve_config(&[])).await;
    let mut client = server.client().await;
    let test: Vec<_> = pairs()
        .into_iter()
        .filter(|p| p.split == "test")
        .take(3)
        .collect();

    let info = client
        .get_model_info(proto::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        info.untrained,
        "the built-in model must say it is untrained"
    );
    assert_eq!(info.labels.len(), 10);
    assert_eq!(
        info.fused_dim,
        info.image_feature_dim + info.audio_feature_dim
    );
    assert_eq!(info.image_feature_dim, 512);
    assert_eq!(info.audio.as_ref().unwrap().sample_rate, 8000);

    let predicted = client
        .predict(proto::PredictRequest {
            samples: test.iter().map(sample).collect(),
            top_k: 3,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(predicted.model_version, info.model_version);
    assert_eq!(predicted.predictions.len(), 3);
    for p in &predicted.predictions {
        assert_eq!(p.scores.len(), 10);
        let sum: f32 = p.probabilities.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4, "softmax sums to {sum}");
        assert_eq!(p.top.len(), 3);
        assert!(p.top[0].probability >= p.top[1].probability);
        assert_eq!(p.top[0].label, info.labels[p.top[0].index as usize]);
    }

    let fused = client
        .fuse(proto::FuseRequest {
            samples: vec![sample(&test[0])],
            include_modalities: true,
        })
        .await
        .unwrap()
        .into_inner();
    let r = &fused.results[0];
    assert_eq!(r.fused.len(), info.fused_dim as usize);
    assert_eq!(r.image.len(), info.image_feature_dim as usize);
    assert_eq!(r.audio.len(), info.audio_feature_dim as usize);
    assert_eq!(r.fused, [r.image.clone(), r.audio.clone()].concat());
    assert!(r.fused.iter().all(|v| v.is_finite()));

    let plain = client
        .fuse(proto::FuseRequest {
            samples: vec![sample(&test[0])],
            include_modalities: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(plain.results[0].image.is_empty() && plain.results[0].audio.is_empty());
    server.stop().await.unwrap();
}

/// A sample gives the same output alone and inside a larger request whose clips have
/// other lengths (padding and masking), within 1e-5.
#[tokio::test]
async fn same_output_alone_and_in_a_padded_batch() {
    let server = TestServer::start(serve_config(&[])).await;
    let mut client = server.client().await;
    // Pick clips of clearly different lengths.
    let mut chosen = pairs();
    chosen.retain(|p| p.split == "test");
    chosen.sort_by_key(|p| std::fs::metadata(&p.wav).unwrap().len());
    let picks = [
        chosen[0].clone(),
        chosen[chosen.len() / 3].clone(),
        chosen[2 * chosen.len() / 3].clone(),
        chosen[chosen.len() - 1].clone(),
    ];
    let together = client
        .fuse(proto::FuseRequest {
            samples: picks.iter().map(sample).collect(),
            include_modalities: false,
        })
        .await
        .unwrap()
        .into_inner();
    let together_pred = client
        .predict(proto::PredictRequest {
            samples: picks.iter().map(sample).collect(),
            top_k: 1,
        })
        .await
        .unwrap()
        .into_inner();
    for (i, p) in picks.iter().enumerate() {
        let alone = client
            .fuse(proto::FuseRequest {
                samples: vec![sample(p)],
                include_modalities: false,
            })
            .await
            .unwrap()
            .into_inner();
        let d = max_abs_diff(&alone.results[0].fused, &together.results[i].fused);
        assert!(
            d <= 1e-5,
            "sample {i}: fused differs by {d} alone vs in a batch"
        );
        let alone_pred = client
            .predict(proto::PredictRequest {
                samples: vec![sample(p)],
                top_k: 1,
            })
            .await
            .unwrap()
            .into_inner();
        let d = max_abs_diff(
            &alone_pred.predictions[0].scores,
            &together_pred.predictions[i].scores,
        );
        assert!(
            d <= 1e-5,
            "sample {i}: scores differ by {d} alone vs in a batch"
        );
    }
    server.stop().await.unwrap();
}

/// Sends a Predict and expects INVALID_ARGUMENT whose message contains every needle.
async fn expect_invalid(
    client: &mut proto::fusion_service_client::FusionServiceClient<tonic::transport::Channel>,
    samples: Vec<proto::Sample>,
    needles: &[&str],
) {
    let status = client
        .predict(proto::PredictRequest { samples, top_k: 0 })
        .await
        .expect_err("a bad request must fail");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    for n in needles {
        assert!(
            status.message().contains(n),
            "message {:?} should contain {n:?}",
            status.message()
        );
    }
}

#[tokio::test]
async fn bad_input_gets_invalid_argument_naming_the_field() {
    let server = TestServer::start(serve_config(&[
        "--max-samples-per-request",
        "4",
        "--max-audio-seconds",
        "3",
        "--max-image-pixels",
        "10000",
    ]))
    .await;
    let mut client = server.client().await;
    let good = sample(&pairs()[0]);
    let with_image = |image: Option<proto::Image>| proto::Sample {
        image,
        audio: good.audio.clone(),
    };
    let with_audio = |data: proto::audio::Data| proto::Sample {
        image: good.image.clone(),
        audio: Some(proto::Audio { data: Some(data) }),
    };
    let wav = match good.audio.clone().unwrap().data.unwrap() {
        proto::audio::Data::Wav(b) => b,
        _ => unreachable!(),
    };

    // Request-level: zero samples, too many samples.
    expect_invalid(&mut client, vec![], &["samples", "no samples"]).await;
    expect_invalid(
        &mut client,
        vec![good.clone(); 5],
        &["samples", "5", "at most 4"],
    )
    .await;
    // Missing modalities.
    expect_invalid(
        &mut client,
        vec![with_image(None)],
        &["samples[0].image", "missing"],
    )
    .await;
    expect_invalid(
        &mut client,
        vec![
            good.clone(),
            proto::Sample {
                image: good.image.clone(),
                audio: None,
            },
        ],
        &["samples[1].audio", "missing"],
    )
    .await;
    // Images: undecodable, truncated, wrong tensor shape, wrong value count, NaN, inf, too big.
    let png = match good.image.clone().unwrap().data.unwrap() {
        proto::image::Data::Encoded(b) => b,
        _ => unreachable!(),
    };
    let encoded = |b: Vec<u8>| {
        Some(proto::Image {
            data: Some(proto::image::Data::Encoded(b)),
        })
    };
    expect_invalid(
        &mut client,
        vec![with_image(encoded(b"definitely not an image".to_vec()))],
        &["samples[0].image.encoded"],
    )
    .await;
    expect_invalid(
        &mut client,
        vec![with_image(encoded(png[..png.len() / 2].to_vec()))],
        &["samples[0].image.encoded"],
    )
    .await;
    expect_invalid(
        &mut client,
        vec![with_image(encoded(vec![]))],
        &["samples[0].image.encoded"],
    )
    .await;
    expect_invalid(
        &mut client,
        vec![with_image(image_tensor(&[28, 28], vec![0.5; 784]))],
        &["samples[0].image.tensor", "shape"],
    )
    .await;
    expect_invalid(
        &mut client,
        vec![with_image(image_tensor(&[1, 28, 28], vec![0.5; 700]))],
        &["samples[0].image.tensor", "700"],
    )
    .await;
    let mut nan = vec![0.5; 784];
    nan[17] = f32::NAN;
    expect_invalid(
        &mut client,
        vec![with_image(image_tensor(&[1, 28, 28], nan))],
        &["samples[0].image.tensor", "17"],
    )
    .await;
    let mut inf = vec![0.5; 784];
    inf[3] = f32::INFINITY;
    expect_invalid(
        &mut client,
        vec![with_image(image_tensor(&[1, 28, 28], inf))],
        &["samples[0].image.tensor"],
    )
    .await;
    expect_invalid(
        &mut client,
        vec![with_image(image_tensor(&[1, 200, 200], vec![0.5; 40_000]))],
        &["samples[0].image", "10000"],
    )
    .await;
    // Audio: truncated WAV, unsupported WAV, too long, NaN PCM, wrong feature width, empty.
    expect_invalid(
        &mut client,
        vec![with_audio(proto::audio::Data::Wav(wav[..30].to_vec()))],
        &["samples[0].audio.wav"],
    )
    .await;
    expect_invalid(
        &mut client,
        vec![with_audio(proto::audio::Data::Wav(
            b"RIFF\x10\x00\x00\x00WAVEjunkjunk".to_vec(),
        ))],
        &["samples[0].audio.wav"],
    )
    .await;
    expect_invalid(
        &mut client,
        vec![with_audio(proto::audio::Data::Pcm(proto::Pcm {
            sample_rate: 8000,
            samples: vec![0.0; 8000 * 4],
        }))],
        &["samples[0].audio", "3"],
    )
    .await;
    expect_invalid(
        &mut client,
        vec![with_audio(proto::audio::Data::Pcm(proto::Pcm {
            sample_rate: 8000,
            samples: vec![0.1, f32::NAN, 0.2],
        }))],
        &["samples[0].audio.pcm"],
    )
    .await;
    expect_invalid(
        &mut client,
        vec![with_audio(proto::audio::Data::Pcm(proto::Pcm {
            sample_rate: 8000,
            samples: vec![0.1, 1200.0, 0.2],
        }))],
        &["samples[0].audio.pcm.samples", "index 1", "outside [-1, 1]"],
    )
    .await;
    expect_invalid(
        &mut client,
        vec![with_audio(proto::audio::Data::Pcm(proto::Pcm {
            sample_rate: 8000,
            samples: vec![],
        }))],
        &["samples[0].audio.pcm"],
    )
    .await;
    expect_invalid(
        &mut client,
        vec![with_audio(proto::audio::Data::Features(tensor(
            &[10, 7],
            vec![0.0; 70],
        )))],
        &["samples[0].audio.features", "40"],
    )
    .await;

    // Still serving after all that.
    let ok = client
        .predict(proto::PredictRequest {
            samples: vec![good],
            top_k: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.predictions.len(), 1);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn other_input_forms_are_accepted() {
    let server = TestServer::start(serve_config(&[])).await;
    let mut client = server.client().await;
    // A CHW tensor image, raw PCM at another rate (resampled), precomputed features.
    let pcm: Vec<f32> = (0..16000).map(|i| (i as f32 * 0.05).sin() * 0.3).collect();
    let samples = vec![
        proto::Sample {
            image: image_tensor(&[1, 28, 28], vec![0.2; 784]),
            audio: Some(proto::Audio {
                data: Some(proto::audio::Data::Pcm(proto::Pcm {
                    sample_rate: 16000,
                    samples: pcm,
                })),
            }),
        },
        proto::Sample {
            image: image_tensor(&[1, 32, 32], vec![0.7; 1024]),
            audio: Some(proto::Audio {
                data: Some(proto::audio::Data::Features(tensor(
                    &[20, 40],
                    vec![-3.0; 800],
                ))),
            }),
        },
    ];
    let r = client
        .predict(proto::PredictRequest { samples, top_k: 2 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.predictions.len(), 2);
    server.stop().await.unwrap();
}

/// Sends bytes as they are: the body a broken or mismatched client would send.
#[derive(Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

#[tokio::test]
async fn undecodable_request_body_is_invalid_argument() {
    let server = TestServer::start(serve_config(&[])).await;
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    // Field 1 (samples) declared length-delimited with a length far past the end.
    let garbage = vec![0x0a, 0xff, 0xff, 0x03, 0x01];
    let path = http::uri::PathAndQuery::from_static("/fusion.v1.FusionService/Predict");
    let status = grpc
        .unary(tonic::Request::new(garbage), path, RawCodec)
        .await
        .expect_err("garbage must be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("not a valid PredictRequest"),
        "{status:?}"
    );
    // The server is still fine.
    let mut client = server.client().await;
    client
        .predict(proto::PredictRequest {
            samples: vec![sample(&pairs()[0])],
            top_k: 1,
        })
        .await
        .unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_beyond_the_preprocess_limit_wait_their_turn() {
    // One request decodes at a time; the others wait for it and are all answered,
    // each with its own sample's output.
    let server = TestServer::start(serve_config(&["--max-concurrent-preprocess", "1"])).await;
    let test: Vec<_> = pairs()
        .into_iter()
        .filter(|p| p.split == "test")
        .take(12)
        .collect();
    let mut client = server.client().await;
    let alone = client
        .predict(proto::PredictRequest {
            samples: test.iter().map(sample).collect(),
            top_k: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let calls = test.iter().map(|p| {
        let mut c = client.clone();
        let s = sample(p);
        async move {
            c.predict(proto::PredictRequest {
                samples: vec![s],
                top_k: 1,
            })
            .await
        }
    });
    let answers = futures::future::join_all(calls).await;
    for (i, a) in answers.into_iter().enumerate() {
        let a = a
            .unwrap_or_else(|s| panic!("request {i}: {s:?}"))
            .into_inner();
        let d = max_abs_diff(&a.predictions[0].scores, &alone.predictions[i].scores);
        assert!(d < 1e-5, "request {i}: {d}");
    }
}

#[tokio::test]
async fn compressed_requests_are_accepted() {
    let server = TestServer::start(serve_config(&[])).await;
    let p = pairs().into_iter().find(|p| p.split == "test").unwrap();
    let request = || proto::PredictRequest {
        samples: vec![sample(&p)],
        top_k: 1,
    };
    let plain = server.client().await.predict(request()).await.unwrap();
    for encoding in [
        tonic::codec::CompressionEncoding::Gzip,
        tonic::codec::CompressionEncoding::Deflate,
    ] {
        let got = server
            .client()
            .await
            .send_compressed(encoding)
            .predict(request())
            .await
            .unwrap_or_else(|s| panic!("{encoding:?}: {s:?}"));
        assert_eq!(
            got.get_ref().predictions,
            plain.get_ref().predictions,
            "{encoding:?}"
        );
    }
}
