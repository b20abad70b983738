plugins {
    id("com.android.application")
}

android {
    namespace = "org.quantface.demo"
    compileSdk = 35

    defaultConfig {
        applicationId = "org.quantface.demo"
        minSdk = 23
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_1_8
        targetCompatibility = JavaVersion.VERSION_1_8
    }

    // LiteRT memory-maps the model: keep .tflite assets uncompressed
    androidResources {
        noCompress += "tflite"
    }

    // Optional: bundle a model as the default (otherwise pick one on the device)
    sourceSets["main"].assets.srcDirs("src/main/assets")
}

dependencies {
    implementation(project(":core"))
    implementation("com.google.ai.edge.litert:litert:1.4.0")
    implementation("com.google.ai.edge.litert:litert-gpu:1.4.0")
}
